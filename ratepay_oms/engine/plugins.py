"""The plugin interface: commands and conditions, registered by the name process files use.

A command does the work of an event (call RatePAY, send a mail, …) before the items change
state; a condition answers a yes/no question about one item so the engine can pick among the
transitions of an event. A shop registers its own next to ours, explicitly with
``registry.register_command`` / ``register_condition`` or through the entry-point group
``ratepay_oms.plugins`` (each entry point is a callable taking the registry).

Commands write what they learned (outcomes per item) through ``ctx.session``: those rows
commit in the same transaction as the state change, so a crash can never leave a recorded
outcome without its state or the other way round. A command that raises leaves its items where
they were; the engine logs the error and schedules a retry with backoff.

A command whose effect lies outside the database and must happen at most once (a RatePAY
booking) is an :class:`ExternalCommand`: it is split into ``prepare`` (decide the call, in a
transaction that also commits an *intent*), ``send`` (the call, outside any transaction),
``apply`` (record the answer, in the transaction that settles the intent and moves the items)
and ``reconcile`` (ask the other side what it booked when the answer was lost). Doing the call
inside the state change's transaction would lose the knowledge that it was made whenever that
transaction dies after the call; re-sending it then books twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ratepay_oms.engine.verdict import Verdict

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ratepay_oms.persistence.models import Order, OrderItem
    from ratepay_oms.process.model import ProcessDefinition

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

ENTRY_POINT_GROUP = "ratepay_oms.plugins"


@dataclass
class CommandContext:
    """What a command or condition may use besides the order and its items."""

    session: Session
    process: ProcessDefinition
    event: str | None
    now: datetime
    services: dict[str, Any] = field(default_factory=dict)
    """Shared objects the host registered on the engine (e.g. ``"ratepay"``: a facade)."""


@runtime_checkable
class ByOrderCommand(Protocol):
    """Runs once for all items of one order that take the same event from the same state."""

    by_order: bool  # True

    def run(self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]) -> None: ...


@runtime_checkable
class ByItemCommand(Protocol):
    """Runs once per item."""

    by_order: bool  # False

    def run_item(self, ctx: CommandContext, order: Order, item: OrderItem) -> None: ...


@dataclass(frozen=True)
class PreparedCall:
    """What ``ExternalCommand.prepare`` decided to send.

    ``summary`` is stored with the intent as JSON (operation, positions, amounts, ids): it is
    all ``apply`` and ``reconcile`` get after a crash, so it must be enough for them.
    ``payload`` is the in-memory request for ``send`` and is not stored.
    """

    summary: dict[str, Any]
    payload: Any = None


@dataclass(frozen=True)
class Reconciled:
    """The other side's word (or a person's) on a call whose answer was lost.

    ``booked`` False means it certainly did not happen, so sending again is safe; True hands
    ``answer`` (may be ``None``) to ``apply`` in place of the lost answer.
    """

    booked: bool
    answer: Any = None
    detail: str = ""


@runtime_checkable
class ExternalCommand(Protocol):
    """A by-order command with an outside effect that must happen exactly once.

    ``send`` raising an exception whose ``sent`` attribute is ``False`` means the request
    certainly never left (the items get a normal retry); any other exception means it may
    have been booked, and the intent stays open for ``reconcile``. ``reconcile`` returns
    ``None`` when it cannot tell (no status source): the items then wait for a person.
    """

    by_order: bool  # True
    external: bool  # True

    def prepare(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall | None: ...

    def send(self, services: dict[str, Any], call: PreparedCall) -> Any: ...

    def apply(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: Any,
    ) -> None: ...

    def reconcile(self, services: dict[str, Any], summary: dict[str, Any]) -> Reconciled | None:
        ...


def is_external(command: object) -> bool:
    return bool(getattr(command, "external", False))


Command = ByOrderCommand | ByItemCommand | ExternalCommand


@runtime_checkable
class Condition(Protocol):
    """Answers for one item; may return a ``Verdict`` (``engine.verdict``) to say what it
    read, which the engine records for ``explain``."""

    def check(self, ctx: CommandContext, order: Order, item: OrderItem) -> bool | Verdict: ...


class UnknownPluginError(LookupError):
    """A process names a command or condition nobody registered."""


class PluginRegistry:
    """Commands and conditions by name (``Ratepay/ConfirmDelivery``)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._conditions: dict[str, Condition] = {}

    def register_command(self, name: str, command: Command) -> None:
        if not hasattr(command, "by_order"):
            raise TypeError(f"command {name!r} must say whether it runs by order (by_order)")
        self._commands[name] = command

    def register_condition(self, name: str, condition: Condition | Callable[..., bool]) -> None:
        if not hasattr(condition, "check"):
            condition = _FunctionCondition(condition)
        self._conditions[name] = condition  # type: ignore[assignment]

    def command(self, name: str) -> Command:
        try:
            return self._commands[name]
        except KeyError:
            raise UnknownPluginError(f"no command plugin registered as {name!r}") from None

    def condition(self, name: str) -> Condition:
        try:
            return self._conditions[name]
        except KeyError:
            raise UnknownPluginError(f"no condition plugin registered as {name!r}") from None

    def has_command(self, name: str) -> bool:
        return name in self._commands

    def has_condition(self, name: str) -> bool:
        return name in self._conditions

    @property
    def command_names(self) -> frozenset[str]:
        return frozenset(self._commands)

    @property
    def condition_names(self) -> frozenset[str]:
        return frozenset(self._conditions)

    def load_entry_points(self) -> None:
        """Let installed packages register their plugins (group ``ratepay_oms.plugins``)."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            log.debug("loading plugins from entry point %s", ep.name)
            ep.load()(self)


@dataclass(frozen=True)
class _FunctionCondition:
    func: Callable[..., bool | Verdict]

    def check(self, ctx: CommandContext, order: Order, item: OrderItem) -> bool | Verdict:
        answer = self.func(ctx, order, item)
        return answer if isinstance(answer, Verdict) else bool(answer)
