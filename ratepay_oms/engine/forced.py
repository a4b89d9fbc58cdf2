"""Forced moves: a person puts one item into a state of its process, with a reason.

Every OMS grows this tool sooner or later (Spryker shops write SQL, django-fsm users call
``set_state``): an item stuck after a gateway outage that was settled by phone, a process bug
fixed in the file but not for the items it stranded. Done by hand in the database it leaves no
trace and can race a worker; here it is refused unless it is safe and is written like any other
move (through the engine's ``StateWriter``), marked as forced, with who and why, in the history
and the transition log.

What it refuses, with nothing written: no reason; a state the item's process does not have (or
the state the item is in); an item waiting on an open gateway-call intent (settle it with
``intents resolve``: moving it would lose the knowledge of a call that may have been booked);
an order whose gateway call another worker has in flight (its lease). It runs no command and
fires no event. The item then behaves as if it had just arrived: the old state's timeouts and
a pending retry are dropped, the target's timeouts armed, and the next tick takes the target's
on-enter event or event-less transitions, if it has any. It is written in one transaction of
the drive loop (``Drive.run``) by that transaction's ``StateWriter``.
"""

from __future__ import annotations

import difflib
import getpass
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from ratepay_oms.engine.errors import OrderNotFoundError
from ratepay_oms.engine.persist import Forced
from ratepay_oms.errors import OmsError
from ratepay_oms.persistence.models import Order, OrderItem

if TYPE_CHECKING:
    from ratepay_oms.engine.runner import Runner
    from ratepay_oms.process.model import ProcessDefinition

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

MAX_ACTOR_LENGTH = 100
"""``oms_state_history.actor`` is a ``VARCHAR(100)``."""


class ForcedMoveError(OmsError):
    """A forced move that was refused (no reason, unknown state, open intent, …); nothing was
    written."""


@dataclass(frozen=True)
class ForcedMove:
    """What ``Engine.force_move`` did."""

    order_ref: str
    item_id: int
    process: str
    from_state: str
    to_state: str
    actor: str
    reason: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "order_ref": self.order_ref,
            "item_id": self.item_id,
            "process": self.process,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "forced": True,
            "actor": self.actor,
            "reason": self.reason,
            "at": self.at.isoformat(),
        }


def default_actor() -> str:
    """The operating-system user, when the caller does not say who forced a move."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def _check_request(reason: str | None, actor: str | None) -> tuple[str, str]:
    text = (reason or "").strip()
    if not text:
        raise ForcedMoveError(
            "a forced move needs a reason (--reason 'why'): it goes into the history for the "
            "next person who looks at this item"
        )
    who = (actor or "").strip() or default_actor()
    if len(who) > MAX_ACTOR_LENGTH:
        raise ForcedMoveError(f"--by is longer than {MAX_ACTOR_LENGTH} characters")
    return text, who


def _check_item(
    definitions: Mapping[str, ProcessDefinition],
    order_ref: str,
    item: OrderItem | None,
    item_id: int,
    to_state: str,
) -> ProcessDefinition:
    if item is None:
        raise ForcedMoveError(f"item {item_id} is not an item of order {order_ref}")
    definition = definitions.get(item.process)
    if definition is None:
        raise ForcedMoveError(
            f"item {item_id} is on process {item.process!r}, which is not loaded; "
            "load its file (--processes) to move it"
        )
    if to_state not in definition.states:
        close = difflib.get_close_matches(to_state, list(definition.states), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ForcedMoveError(
            f"{to_state!r} is not a state of process {definition.name}{hint}; states: "
            + ", ".join(definition.states)
        )
    if to_state == item.state:
        raise ForcedMoveError(f"item {item_id} is in {to_state!r} already")
    if item.intent_id is not None:
        raise ForcedMoveError(
            f"item {item_id} waits for the outcome of gateway call intent {item.intent_id}; "
            "settle it first ('ratepay-oms intents list', 'intents resolve'): a forced move "
            "would lose a call that may have been booked"
        )
    return definition


@dataclass(frozen=True)
class ForcedMoveRequest:
    """A checked request (reason and actor present); :meth:`apply` does it inside the drive
    loop's transaction (``Drive.run``), through the runner's ``StateWriter``."""

    order_ref: str
    item_id: int
    to_state: str
    actor: str
    reason: str

    @classmethod
    def of(
        cls, order_ref: str, item_id: int, to_state: str, reason: str | None, by: str | None
    ) -> ForcedMoveRequest:
        text, actor = _check_request(reason, by)
        return cls(order_ref, item_id, to_state, actor, text)

    def apply(self, runner: Runner) -> ForcedMove:
        session = runner.session
        order = session.scalar(select(Order).where(Order.order_ref == self.order_ref))
        if order is None:
            raise OrderNotFoundError(f"no order {self.order_ref!r}")
        # Waits for a transaction that has the order; refused while a worker's gateway call
        # is in flight for it (OrderLockedError).
        runner.engine.claims.lock_one(session, order.id, f"order {self.order_ref}")
        item = session.get(OrderItem, self.item_id)
        if item is not None and item.order_id != order.id:
            item = None
        definitions = runner.engine.definitions
        _check_item(definitions, self.order_ref, item, self.item_id, self.to_state)
        assert item is not None
        source = item.state
        runner.writer.write_forced_move(
            item, self.to_state, Forced(self.actor, self.reason), definitions
        )
        log.info(
            "forced move: order %s item %d %s -> %s by %s (%s)",
            self.order_ref, self.item_id, source, self.to_state, self.actor, self.reason,
        )
        return ForcedMove(self.order_ref, self.item_id, item.process, source, self.to_state,
                          self.actor, self.reason, runner.now)
