"""The cyclic garbage collector held off while one drive works through a big order.

A 10,000-unit order is 10,000 ORM objects (each with its state, dict and weakref) that live
for the whole transaction, plus a run of short-lived rows and tuples per round. Every 700
allocations CPython runs a young collection, and once enough objects have survived into the
old generation (a quarter of it) a *full* one, which walks every tracked object of the
process: the imported modules, SQLAlchemy's caches, the host's data. Placing such an order
ran six of those (about 0.14 s each on the project's machine) and shipping it three: a
quarter of their CPU, for no garbage at all (the items are freed by reference counting when
the session closes; nothing of a drive forms cycles that must be collected before it ends).

:class:`CollectorPause` switches the collector off for the rest of a ``with`` block once the
work is known to be big (:meth:`CollectorPause.engage` with the number of items, at or above
:data:`BULK_ITEMS`) and on again when the last such block in the process ends. Small work, the
common case, never touches it. A collector the host switched off itself stays off, and
concurrent drives (threads) share one pause: the collector comes back when the last ends.
"""

from __future__ import annotations

import gc
import threading
from types import TracebackType

BULK_ITEMS = 1000
"""Items from which one drive pauses the collector (an order of 1,000 units allocates enough
to trigger full collections; below, the young ones are all it runs and they cost little)."""

_lock = threading.Lock()
_holders = 0
_switched_off = False
"""Whether the holders switched the collector off (not the host): only then is it switched
on again when the last ends."""


class CollectorPause:
    """``with CollectorPause() as pause: … pause.engage(len(items)) …``: from ``engage`` with
    at least ``threshold`` items to the end of the block, no cyclic collection runs."""

    def __init__(self, threshold: int = BULK_ITEMS) -> None:
        self.threshold = threshold
        self.engaged = False

    def engage(self, items: int) -> None:
        """Pause the collector if ``items`` makes the work big (once; later calls are no-ops)."""
        global _holders, _switched_off
        if self.engaged or items < self.threshold:
            return
        with _lock:
            if _holders == 0 and gc.isenabled():
                gc.disable()
                _switched_off = True
            _holders += 1
        self.engaged = True

    def release(self) -> None:
        global _holders, _switched_off
        if not self.engaged:
            return
        self.engaged = False
        with _lock:
            _holders -= 1
            if _holders == 0 and _switched_off:
                _switched_off = False
                gc.enable()

    def __enter__(self) -> CollectorPause:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
