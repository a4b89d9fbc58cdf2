"""The engine: process definitions compiled into ``transitions`` machines, driving per-item
state in the database (``Engine``: place orders, fire manual events, tick).

Modules: ``compiler`` (definition → cached machine), ``runner`` (command, conditions, moves,
on-enter cascade), ``persist`` (set-based writes), ``tick`` (what is due, in batches),
``claims`` (per-order leases), ``views`` (results), ``plugins`` (the command/condition
interface), ``errors``.
"""

from ratepay_oms.engine.errors import (
    ManualEventError,
    OrderLockedError,
    OrderNotFoundError,
    UnknownProcessError,
)

__all__ = [
    "Engine",
    "ManualEventError",
    "OrderLockedError",
    "OrderNotFoundError",
    "UnknownProcessError",
]


def __getattr__(name: str) -> object:
    if name == "Engine":
        from ratepay_oms.engine.engine import Engine

        return Engine
    raise AttributeError(name)
