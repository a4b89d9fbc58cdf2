"""OMS commands and conditions shipped with ratepay-oms, and the default registry.

``build_default_registry()`` is what the engine and ``process check`` use when the host passes
no registry of its own: our RatePAY plugins plus whatever installed packages register through
the ``ratepay_oms.plugins`` entry-point group.
"""

from __future__ import annotations

from ratepay_oms.engine.plugins import PluginRegistry


def build_default_registry() -> PluginRegistry:
    registry = PluginRegistry()
    try:
        from ratepay_oms.plugins.ratepay import register as register_ratepay
    except ModuleNotFoundError as exc:  # the RatePAY plugins are not written yet
        if exc.name != "ratepay_oms.plugins.ratepay":
            raise
    else:
        register_ratepay(registry)
    registry.load_entry_points()
    return registry
