"""Operator console queries: what the back office sees and does, without any Click in it.

Each module answers one operator question against the engine's tables (the contract in
``ratepay_oms.persistence.models``): where items stand (``matrix``), everything about one order
(``inspect``), what the gateway was asked and answered (``apilog``), which worker holds which
order (``locks``), and moving running items to a new process version (``migrate``). The CLI in
``ratepay_oms.cli.console`` is a thin layer over these, so a shop can call them from its own
back office too.
"""

from __future__ import annotations

from ratepay_oms.console._session import ConsoleError, utc_now

__all__ = ["ConsoleError", "utc_now"]
