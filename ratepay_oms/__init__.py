"""ratepay-oms: an order state machine engine for RatePAY payments.

``from ratepay_oms import Engine`` is the door for order backends; see the README.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

logging.getLogger(__name__).addHandler(logging.NullHandler())
__all__ = ["Engine", "__version__"]

if TYPE_CHECKING:
    from ratepay_oms.engine.engine import Engine

    __version__: str


def _version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    from importlib import metadata

    try:
        return metadata.version("ratepay-oms")
    except metadata.PackageNotFoundError:  # pragma: no cover - a checkout never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import ratepay_oms`` stays cheap for the CLI's --help.
    if name == "__version__":
        version = _version()
        globals()["__version__"] = version
        return version
    if name == "Engine":
        from ratepay_oms.engine.engine import Engine

        return Engine
    raise AttributeError(name)
