"""ratepay-oms: an order state machine engine for RatePAY payments.

``from ratepay_oms import Engine`` is the door for order backends; see the README.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import TYPE_CHECKING, Any

logging.getLogger(__name__).addHandler(logging.NullHandler())

try:
    __version__ = metadata.version("ratepay-oms")
except metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout never installed
    __version__ = "0+unknown"
__all__ = ["Engine", "__version__"]

if TYPE_CHECKING:
    from ratepay_oms.engine.engine import Engine


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import ratepay_oms`` stays cheap for the CLI's --help.
    if name == "Engine":
        from ratepay_oms.engine.engine import Engine

        return Engine
    raise AttributeError(name)
