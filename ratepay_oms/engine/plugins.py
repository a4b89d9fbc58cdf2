"""The plugin interface: four kinds of plugin, registered by the name process files use.

A *command* does the work of an event before the items change state; a *condition* answers a
yes/no question about one item so the engine can pick among the transitions of an event. Each
kind is its own base class with its own ``register_*`` method, so mypy checks a plugin against
the methods the engine will call, and the engine tells the kinds apart by type:

- :class:`ByItemCommand` — ``run_item`` once per item, inside the transaction that moves it;
- :class:`ByOrderCommand` — ``run`` once per (order, source state, event) group, same;
- :class:`ExternalCommand` — an effect outside the database that must happen exactly once (a
  RatePAY booking). ``plan`` decides the call, touching only the database (it runs in the
  transaction that writes the moves, which also commits an *intent* row: what will be sent);
  ``send`` makes every network call, outside any transaction; ``apply`` records the answer in
  the transaction that settles the intent and moves the items; ``reconcile`` asks the other
  side what it booked when the answer was lost. Doing the call inside the state change's
  transaction would lose the knowledge that it was made whenever that transaction dies after
  the call (re-sending then books twice), and holds database locks for a network round trip;
- :class:`Condition` — ``check`` one item (read only).

Commands write what they learned (outcomes per item) through ``ctx.session``: those rows commit
in the same transaction as the state change, so a crash can never leave a recorded outcome
without its state or the other way round. A command that raises leaves its items where they
were; the engine logs the error and schedules a retry with backoff.

A shop registers its own plugins next to ours, explicitly or through the entry-point group
``ratepay_oms.plugins`` (each entry point is a callable taking the registry).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

from ratepay_oms.engine.verdict import Verdict

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ratepay_oms.persistence.models import Order, OrderItem
    from ratepay_oms.process.model import ProcessDefinition

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

ENTRY_POINT_GROUP = "ratepay_oms.plugins"

PayloadT = TypeVar("PayloadT")
AnswerT = TypeVar("AnswerT")


INSTALLMENT_SERVICE = "installments"
"""The ``services`` key of the instalment calculator behind ``Engine.calculate_installment``
(a callable ``(amount, *, months, rate, payment_firstday)``; the RatePAY plugin registers one)."""


@dataclass
class CommandContext:
    """What a command or condition may use besides the order and its items (inside a
    transaction: ``session`` is the one that writes the moves)."""

    session: Session
    process: ProcessDefinition
    event: str | None
    now: datetime
    services: dict[str, Any] = field(default_factory=dict)
    """Shared objects the host registered on the engine (e.g. ``"ratepay"``: a facade)."""
    data: Mapping[str, Any] = field(default_factory=dict)
    """What the person gave with the manual event (``Engine.trigger(..., data=...)``), for
    the commands of that event; empty for every other group (cascades read it from the
    history rows of the move: ``StateHistory.data``)."""
    memo: dict[Hashable, Any] = field(default_factory=dict)
    """Scratch space for one group (one context per group, built before its command runs):
    a condition reads what it needs for all items of the order once, on its first check
    after the command, instead of one query per item (e.g. the newest outcome per item)."""


@dataclass
class CallContext:
    """What :meth:`ExternalCommand.send` and ``reconcile`` may use: no database session (they
    run outside any transaction), the engine's services, and :meth:`remember`."""

    services: Mapping[str, Any]
    remember: Callable[[Mapping[str, Any]], None] = field(default=lambda facts: None)
    """Store ``facts`` in the intent's summary at once (its own short transaction), before
    the next network call: what ``reconcile`` will need if the answer of that call is lost
    (e.g. the transaction id an earlier, non-booking call returned)."""


class ByItemCommand(ABC):
    """Runs once per item, inside the transaction that moves it."""

    @abstractmethod
    def run_item(self, ctx: CommandContext, order: Order, item: OrderItem) -> None: ...


class ByOrderCommand(ABC):
    """Runs once for all items of one order that take the same event from the same state,
    inside the transaction that moves them."""

    @abstractmethod
    def run(self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]) -> None: ...


@dataclass(frozen=True)
class PreparedCall(Generic[PayloadT]):
    """What :meth:`ExternalCommand.plan` decided to send.

    ``summary`` is stored with the intent as JSON (operation, positions, amounts, ids): it is
    all ``apply`` and ``reconcile`` get after a crash, so it must be enough for them.
    ``payload`` is the in-memory request for ``send`` and is not stored.
    """

    summary: dict[str, Any]
    payload: PayloadT


@dataclass(frozen=True)
class Reconciled:
    """The other side's word (or a person's) on a call whose answer was lost.

    ``booked`` False means it certainly did not happen, so sending again is safe; True hands
    ``answer`` (may be ``None``) to ``apply`` in place of the lost answer.
    """

    booked: bool
    answer: Any = None
    detail: str = ""


class ReconcileLater(Exception):
    """Raised by :meth:`ExternalCommand.reconcile` when the other side cannot tell *yet* (a
    booking may take a while to show): the intent stays pending, nothing is re-sent, nobody is
    called, and it is asked again with backoff, at the latest at ``at`` (when the answer
    becomes final)."""

    def __init__(self, detail: str, at: datetime | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.at = at


class CallNotSentError(Exception):
    """Raised by :meth:`ExternalCommand.send`: the booking certainly never left (connection
    refused, an earlier non-booking step failed), so the items get an ordinary retry. Any
    other exception from ``send`` means it may have been booked: the intent stays open and is
    reconciled, never re-sent blindly."""


class ExternalCommand(ABC, Generic[PayloadT, AnswerT]):
    """A by-order command with an outside effect that must happen exactly once.

    ``plan`` returns ``None`` when it decided without a call (having recorded why through
    ``ctx.session``): the engine then goes on as if answered. ``reconcile`` returns ``None``
    when it cannot tell (no status source): the items then wait for a person.
    """

    @abstractmethod
    def plan(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall[PayloadT] | None:
        """Decide the call from the database alone (no network: this runs in a transaction)."""

    @abstractmethod
    def send(self, call: PreparedCall[PayloadT], io: CallContext) -> AnswerT:
        """Make the call (every network request of it), outside any transaction."""

    @abstractmethod
    def apply(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: AnswerT | Reconciled,
    ) -> None:
        """Record the answer (or the reconciled verdict) for the items."""

    def reconcile(self, summary: dict[str, Any], io: CallContext) -> Reconciled | None:
        """What the other side booked for a call whose answer was lost; ``None``: nobody can
        tell (the default), a person decides; raise :class:`ReconcileLater` when the answer
        is not final yet."""
        return None


class Condition(ABC):
    """A yes/no question about one item (read only)."""

    @abstractmethod
    def check(self, ctx: CommandContext, order: Order, item: OrderItem) -> bool | Verdict:
        """The answer; a ``Verdict`` (``engine.verdict``) also says what it read, which the
        engine records for ``explain``."""

    def check_many(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> Sequence[bool | Verdict]:
        """The answers for ``items`` of one group, one per item in their order: what
        :meth:`check` answers for each (this default asks it). The engine asks a group's
        items together; a condition that answers them cheaper at once overrides this. When
        it raises, the engine asks item by item to find the one that fails."""
        return [self.check(ctx, order, item) for item in items]

    def reads_database(self, ctx: CommandContext, order: Order) -> bool:
        """Whether asking this condition about ``order``'s items now may run SQL. ``True``
        (the default) has the engine ask inside a savepoint, so that a statement failing
        inside the database (PostgreSQL then refuses the rest of the transaction) fails only
        these items. A condition that answers from what it already has (``ctx.memo``, filled
        by the command that just ran) says ``False`` and is asked without one: the
        savepoint's bookkeeping cost more than such an answer. When it is wrong and a
        statement fails, the whole transaction rolls back instead of only these items."""
        return True


ConditionFunction: TypeAlias = "Callable[[CommandContext, Order, OrderItem], bool | Verdict]"
AnyCommand: TypeAlias = "ByItemCommand | ByOrderCommand | ExternalCommand[Any, Any]"


class UnknownPluginError(LookupError):
    """A process names a command or condition nobody registered."""


class PluginRegistry:
    """Commands and conditions by name (``Ratepay/ConfirmDelivery``), one kind each."""

    def __init__(self) -> None:
        self._commands: dict[str, AnyCommand] = {}
        self._conditions: dict[str, Condition] = {}

    def register_by_item(self, name: str, command: ByItemCommand) -> None:
        self._add(name, command, ByItemCommand)

    def register_by_order(self, name: str, command: ByOrderCommand) -> None:
        self._add(name, command, ByOrderCommand)

    def register_external(self, name: str, command: ExternalCommand[Any, Any]) -> None:
        self._add(name, command, ExternalCommand)

    def register_condition(self, name: str, condition: Condition | ConditionFunction) -> None:
        if isinstance(condition, Condition):
            self._conditions[name] = condition
        elif callable(condition):
            self._conditions[name] = _FunctionCondition(condition)
        else:
            raise TypeError(f"condition {name!r} must be a Condition or a function")

    def _add(self, name: str, command: AnyCommand, kind: type) -> None:
        if not isinstance(command, kind):
            raise TypeError(
                f"command {name!r} must be a {kind.__name__} (ratepay_oms.engine.plugins), "
                f"got {type(command).__name__}"
            )
        self._commands[name] = command

    def command(self, name: str) -> AnyCommand:
        try:
            return self._commands[name]
        except KeyError:
            raise UnknownPluginError(f"no command plugin registered as {name!r}") from None

    def external(self, name: str) -> ExternalCommand[Any, Any]:
        command = self.command(name)
        if not isinstance(command, ExternalCommand):
            raise UnknownPluginError(f"command {name!r} is not an external command")
        return command

    def condition(self, name: str) -> Condition:
        try:
            return self._conditions[name]
        except KeyError:
            raise UnknownPluginError(f"no condition plugin registered as {name!r}") from None

    def is_external(self, name: str) -> bool:
        return isinstance(self._commands.get(name), ExternalCommand)

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


class _FunctionCondition(Condition):
    """A plain function registered as a condition."""

    def __init__(self, func: ConditionFunction) -> None:
        self.func = func

    def check(self, ctx: CommandContext, order: Order, item: OrderItem) -> bool | Verdict:
        answer = self.func(ctx, order, item)
        return answer if isinstance(answer, Verdict) else bool(answer)
