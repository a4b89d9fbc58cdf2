"""Errors a caller of the engine can cause (and fix): each says what to do about it."""

from __future__ import annotations

from ratepay_oms.errors import OmsError
from ratepay_oms.process.errors import UnknownProcessError

__all__ = [
    "BookingInDoubtError",
    "ManualEventError",
    "OrderLockedError",
    "OrderNotFoundError",
    "UnknownProcessError",
]


class OrderNotFoundError(OmsError):
    """No order with that reference."""


class ManualEventError(OmsError):
    """A manual trigger that cannot apply: unknown or non-manual event, or items that are not
    in a state accepting it. Nothing was written."""


class OrderLockedError(OmsError):
    """Another worker holds the order's lease; try again once it is released or expired."""


class BookingInDoubtError(OmsError):
    """A booking a person asked for on an order with another booking in doubt: that one is
    settled first (reconciled by the tick, or resolved by a person). Nothing was written."""
