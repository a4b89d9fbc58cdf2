"""A condition's answer together with what it read, so ``explain`` can show it later.

A condition plugin may return a plain ``bool``; one that returns a :class:`Verdict` also says
what it looked at (the outcome row, the result code, a flag of the order), which the engine
records with the result (``oms_condition_result``). "Condition C returned false" is half an
answer; "…because the newest delivery outcome of the item is result 405 from 12:03" lets an
operator act.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """``holds``: the condition's answer; ``read``: JSON-able facts it decided on."""

    holds: bool
    read: Mapping[str, Any] = field(default_factory=dict)
    encoded: str | None = field(default=None, compare=False, repr=False)
    """``read`` already as JSON (sorted keys, ``default=str``), if the condition has it: the
    engine records this instead of encoding ``read`` again. A condition that answers the
    10,000 units of a big order from rows that differ only in an id encodes once and splices
    the id in (encoding was a tenth of placing such an order)."""

    def __bool__(self) -> bool:
        return self.holds


def verdict_of(answer: object) -> Verdict:
    """A condition's return value as a :class:`Verdict` (a plain truth value read nothing)."""
    if isinstance(answer, Verdict):
        return answer
    return Verdict(bool(answer))
