"""The engine: the one door an order backend, the CLI and the console go through.

``Engine`` ties the parts together: process definitions (loaded and compiled once), the plugin
registry, the database, and the worker identity used for order leases. Its methods are whole
units of work, each in its own transaction(s); what they return are detached snapshots
(``ratepay_oms.engine.views``), never live ORM rows.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from ratepay_oms.config import OmsConfig, attach_ratepay
from ratepay_oms.engine.claims import Claims, LeaseKeeper
from ratepay_oms.engine.clock import naive_utc
from ratepay_oms.engine.collector import CollectorPause
from ratepay_oms.engine.compiler import CompiledProcess, compile_processes
from ratepay_oms.engine.context import EngineContext
from ratepay_oms.engine.drive import DEFAULT_CONCURRENCY, Drive
from ratepay_oms.engine.errors import (
    ManualEventError,
    OrderNotFoundError,
    UnknownProcessError,
)
from ratepay_oms.engine.intents import IntentError, IntentView, list_intents
from ratepay_oms.engine.outbox import DeliveryResult, NotificationSettings, OutboxDelivery
from ratepay_oms.engine.persist import Origin
from ratepay_oms.engine.plugins import INSTALLMENT_SERVICE, PluginRegistry, Reconciled
from ratepay_oms.engine.runner import (
    RESOLVED_BOOKED,
    RESOLVED_NOT_BOOKED,
    Group,
    Runner,
    RunStats,
    group_items,
)
from ratepay_oms.engine.tick import DEFAULT_BATCH_SIZE, TickRunner
from ratepay_oms.engine.views import (
    ITEM_VIEW_FIELDS,
    HistoryEntry,
    ItemView,
    OrderView,
    TickResult,
    TransitionLogEntry,
    TriggerResult,
)
from ratepay_oms.errors import OmsError
from ratepay_oms.ops import instruments
from ratepay_oms.ops.tracing import span
from ratepay_oms.orders import (
    DEFAULT_PAYMENT_FIRSTDAY,
    OrderInput,
    OrderInputError,
    parse_order,
)
from ratepay_oms.persistence.db import (
    create_db_engine,
    session_factory,
    upgrade,
)
from ratepay_oms.persistence.models import (
    INTENT_OPEN_STATUSES,
    Intent,
    Order,
    OrderItem,
    StateHistory,
    TransitionLog,
)
from ratepay_oms.process.model import ProcessDefinition

if TYPE_CHECKING:
    from ratepay_oms.engine.explain import OrderExplanation
    from ratepay_oms.engine.forced import ForcedMove
    from ratepay_oms.engine.many import EventOutcome, EventRequest

log = logging.getLogger(__name__)

PLUGINS_ENV = "RATEPAY_OMS_PLUGINS"


class EngineConfigError(OmsError):
    """A service the call needs is not configured; the message names the settings."""


class PluginConfigError(OmsError):
    """``$RATEPAY_OMS_PLUGINS`` names something that cannot be imported or called."""


def load_env_plugins(registry: PluginRegistry, spec: str | None = None) -> None:
    """Call each ``module:function`` of ``spec`` (default ``$RATEPAY_OMS_PLUGINS``, comma
    separated) with ``registry``, so a shop or a test subprocess adds plugins without code."""
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        module_name, _, func_name = entry.partition(":")
        if not module_name or not func_name:
            raise PluginConfigError(f"{PLUGINS_ENV}: {entry!r} is not 'package.module:function'")
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise PluginConfigError(f"{PLUGINS_ENV}: cannot load {entry!r}: {exc}") from exc
        func(registry)


def default_registry(plugins: str | None = None) -> PluginRegistry:
    """Our plugins, entry-point plugins, and ``plugins`` (default ``$RATEPAY_OMS_PLUGINS``)."""
    from ratepay_oms.plugins import build_default_registry

    registry = build_default_registry()
    load_env_plugins(registry, plugins)
    return registry


def _pool_for(url: str, concurrency: int) -> dict[str, Any]:
    """Connection pool options for ``concurrency`` calls in flight (servers only; SQLite's
    pool is per thread already)."""
    if url.startswith("sqlite"):
        return {}
    return {"pool_size": concurrency + 2, "max_overflow": concurrency + 2}


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Engine:
    """Places orders, fires manual events, runs the tick, answers read-only queries.

    ``definitions`` (an addition to the contract) hands in already-built process definitions
    instead of loading ``process_dir``: for embedding and for tests.

    Settings are found as the console finds them (``ratepay_oms.config``): the arguments, then
    the environment, then the config file (``config``, ``$RATEPAY_OMS_CONFIG`` or
    ``./ratepay-oms.toml``). RatePAY is attached from there unless ``services`` has it;
    ``ratepay_settings`` (a ``RatepaySettings``) overrides the environment and the file.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        process_dir: str | Path | None = None,
        registry: PluginRegistry | None = None,
        services: Mapping[str, Any] | None = None,
        worker_id: str | None = None,
        lease_seconds: int = 60,
        definitions: Mapping[str, ProcessDefinition] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        notifications: NotificationSettings | None = None,
        config: str | Path | OmsConfig | None = None,
        ratepay_settings: Any = None,
    ) -> None:
        cfg = config if isinstance(config, OmsConfig) else OmsConfig.load(config)
        self.config = cfg
        self.database_url = cfg.resolve_database_url(database_url)
        self.registry = registry if registry is not None else default_registry(cfg.plugins_spec())
        if definitions is None:
            from ratepay_oms.process.loader import load_processes

            definitions = load_processes(cfg.resolve_process_dir(process_dir), self.registry)
        self.notifications = (
            notifications if notifications is not None else NotificationSettings.from_env()
        )
        if self.notifications.all_states:
            definitions = {n: replace(d, notify_all=True) for n, d in definitions.items()}
        self._compiled: dict[str, CompiledProcess] = compile_processes(
            dict(definitions), self.registry
        )
        self.services: dict[str, Any] = dict(services or {})
        self.worker_id = worker_id or default_worker_id()
        self.lease_seconds = lease_seconds
        self.batch_size = batch_size
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.concurrency = concurrency
        # One connection per call in flight, one for the deciding thread, one for the lease
        # keeper (an API-log row written apart, when a settle did not commit, goes through the
        # same pool).
        self.db = create_db_engine(self.database_url, **_pool_for(self.database_url, concurrency))
        self._sessions = session_factory(self.db)
        self.claims = Claims(self._sessions, self.worker_id, lease_seconds)
        self.origin = Origin.current()
        attach_ratepay(self, cfg, ratepay_settings)  # before the context shares the services
        self.context = EngineContext(
            sessions=self._sessions,
            compiled=self._compiled,
            definitions={name: c.definition for name, c in self._compiled.items()},
            registry=self.registry,
            services=self.services,
            claims=self.claims,
            origin=self.origin,
        )
        self.leases = LeaseKeeper(self.claims)

    # -- housekeeping ----------------------------------------------------------------------

    def upgrade_db(self) -> None:
        upgrade(self.database_url)

    def session(self) -> Session:
        """A new session (use as a context manager) for plugins and console queries."""
        return self._sessions()

    def definitions(self) -> Mapping[str, ProcessDefinition]:
        return {name: c.definition for name, c in self._compiled.items()}

    def clear_expired_leases(self) -> int:
        """Release leases whose worker died (``locks clear``); returns how many."""
        return self.claims.clear_expired()

    def close(self) -> None:
        self.leases.close()
        self.db.dispose()

    def _definition(self, process: str) -> ProcessDefinition:
        compiled = self._compiled.get(process)
        if compiled is None:
            known = ", ".join(sorted(self._compiled)) or "none loaded"
            raise UnknownProcessError(f"unknown process {process!r} (known processes: {known})")
        return compiled.definition

    def _drive(self, now: datetime, stats: RunStats) -> Drive:
        return Drive(self.context, self.leases, now, stats)

    # -- placing orders --------------------------------------------------------------------

    def place_order(
        self,
        order: OrderInput | Mapping[str, Any],
        *,
        now: datetime | None = None,
        fire: bool = True,
    ) -> OrderView:
        """Store the order with one item row per unit in the process's initial state.

        With ``fire`` the on-enter cascade of the initial state runs at once, in the same
        transaction (as Spryker does at checkout); otherwise the next tick runs it.
        """
        order_input = order if isinstance(order, OrderInput) else parse_order(order)
        definition = self._definition(order_input.process)
        now = naive_utc(now)

        def place(runner: Runner) -> None:
            session = runner.session
            self._refuse_duplicate(session, order_input.order_ref)
            row = Order(
                order_ref=order_input.order_ref,
                process=definition.name,
                currency=order_input.currency,
                customer_ref=order_input.customer.customer_ref,
                data=_dump(order_input.to_dict()),
                goods_total=order_input.goods_total,
                created_at=now,
            )
            session.add(row)
            session.flush()
            items = _insert_items(session, row, order_input, definition, now)
            runner.writer.enter_initial(items, definition)
            on_enter = definition.on_enter_event(definition.initial)
            if fire and on_enter is not None:
                runner.run(group_items([(i, on_enter.name) for i in items], {row.id: row}))

        with CollectorPause() as pause:
            pause.engage(sum(line.quantity for line in order_input.items))
            try:
                # The payment request runs after the order is committed (its intent with it).
                self._drive(now, RunStats()).run(place)
            except IntegrityError as exc:
                with self._sessions() as session:
                    if session.scalar(
                        select(Order.id).where(Order.order_ref == order_input.order_ref)
                    ):
                        raise _duplicate(order_input.order_ref) from exc
                raise
            view = self.order(order_input.order_ref)
        log.info("placed order %s (%s, %d items)", view.order_ref, view.process, len(view.items))
        return view

    @staticmethod
    def _refuse_duplicate(session: Session, order_ref: str) -> None:
        if session.scalar(select(Order.id).where(Order.order_ref == order_ref)) is not None:
            raise _duplicate(order_ref)

    # -- manual events ---------------------------------------------------------------------

    def trigger(
        self,
        event: str,
        order_ref: str,
        item_ids: Sequence[int] | None = None,
        *,
        now: datetime | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> TriggerResult:
        """Fire a manual event for items of one order (default: every item that accepts it).

        ``data`` (a JSON object: invoice id, tracking ids, …) is handed to the event's
        command (``CommandContext.data``) and stored with the history rows of the move, where
        the commands of the states it leads to find it (``ship`` → the delivery confirmation).

        Refuses (``ManualEventError``, nothing written) an unknown or non-manual event and
        items whose state does not accept it; ``OrderLockedError`` while another worker holds
        the order's lease.
        """
        now = naive_utc(now)
        stats = RunStats()
        event_data = _event_data(data)
        pause = CollectorPause()

        def fire(runner: Runner) -> None:
            runner.data = event_data
            session = runner.session
            order = self._find(session, order_ref)
            definition = self._definition(order.process)
            # Waits for a transaction that has the order; refused only while a gateway call
            # of another worker is in flight for it.
            self.claims.lock_one(session, order.id, f"order {order_ref}")
            items = list(
                session.scalars(
                    select(OrderItem).where(OrderItem.order_id == order.id).order_by(OrderItem.id)
                )
            )
            # Every item of the order, ordered as the relationship is: a command that reads
            # ``order.items`` (a booking's whole basket) does not load them again.
            set_committed_value(order, "items", list(items))
            chosen = _select_for_event(definition, order_ref, event, items, item_ids)
            pause.engage(len(chosen))  # a big order's objects live until its calls settle
            runner.run(
                group_items([(i, event) for i in chosen], {order.id: order}), record_stays=True
            )

        with pause:
            self._drive(now, stats).run(fire)
        return _trigger_result(event, stats)

    def trigger_many(
        self,
        event: str,
        requests: Sequence[EventRequest],
        *,
        now: datetime | None = None,
        concurrency: int | None = None,
    ) -> list[EventOutcome]:
        """Fire the manual ``event`` for many orders at once (bulk events): one transaction
        per chunk of orders, their gateway calls ``concurrency`` at a time (default: the
        engine's); one outcome per request (see ``ratepay_oms.engine.many``)."""
        from ratepay_oms.engine.many import fire_many

        drive = self._drive(naive_utc(now), RunStats())
        return fire_many(drive, event, requests, concurrency or self.concurrency)

    # -- operator tools ----------------------------------------------------------------------

    def force_move(
        self,
        order_ref: str,
        item_id: int,
        to_state: str,
        *,
        reason: str,
        by: str | None = None,
        now: datetime | None = None,
    ) -> ForcedMove:
        """Put one item into ``to_state`` by a person's decision, with ``reason`` and ``by``
        recorded; refused while the item has an open intent or the order is leased (see
        ``ratepay_oms.engine.forced``)."""
        from ratepay_oms.engine.forced import ForcedMoveRequest

        request = ForcedMoveRequest.of(order_ref, item_id, to_state, reason, by)
        return self._drive(naive_utc(now), RunStats()).run(request.apply)

    def explain(
        self, order_ref: str, item_id: int | None = None, *, now: datetime | None = None
    ) -> OrderExplanation:
        """Per item: its state and since when, every transition out of it, and why it is not
        moving now (see ``ratepay_oms.engine.explain``). Read-only."""
        from ratepay_oms.engine.explain import explain_order

        with self._sessions() as session:
            return explain_order(
                session, self.definitions(), order_ref, item_id=item_id, now=naive_utc(now)
            )

    # -- bookings outside a transition ----------------------------------------------------

    def run_external(
        self,
        command: str,
        order_ref: str,
        data: Mapping[str, Any],
        *,
        now: datetime | None = None,
    ) -> TriggerResult:
        """Run the external command ``command`` once on order ``order_ref``, outside any
        transition, with ``data`` as its ``CommandContext.data``: planned with an intent,
        sent after the plan commits, settled exactly once (reconciled if the answer is lost),
        like every booking. The intent covers the order's first item (it blocks only that
        item's events while the call is in flight); nothing moves unless an event-less
        transition of that item's state applies after it."""
        now = naive_utc(now)
        stats = RunStats()
        event_data = _event_data(data)
        if not self.registry.is_external(command):
            raise ManualEventError(f"{command} is not an external command")

        def fire(runner: Runner) -> None:
            runner.data = event_data
            session = runner.session
            order = self._find(session, order_ref)
            self.claims.lock_one(session, order.id, f"order {order_ref}")
            first = session.scalars(
                select(OrderItem).where(OrderItem.order_id == order.id).order_by(OrderItem.id)
            ).first()
            if first is None:
                raise ManualEventError(f"order {order_ref} has no items")
            runner.plan_external(Group(order, first.process, first.state, None, [first]), command)

        self._drive(now, stats).run(fire)
        return _trigger_result(command, stats)

    def credit(
        self,
        order_ref: str,
        amount: Decimal,
        *,
        tax_rate: Decimal | None = None,
        reason: str | None = None,
        now: datetime | None = None,
    ) -> Any:
        """A goodwill credit of ``amount`` on the delivered order (RatePAY PAYMENT_CHANGE
        credit), exactly once; see ``ratepay_oms.plugins.ratepay.adjustments.book``."""
        from ratepay_oms.plugins.ratepay.adjustments import book

        return book(self, "credit", order_ref, amount, tax_rate=tax_rate, reason=reason, now=now)

    def debit(
        self,
        order_ref: str,
        amount: Decimal,
        *,
        tax_rate: Decimal | None = None,
        reason: str | None = None,
        now: datetime | None = None,
    ) -> Any:
        """An adjustment charge of ``amount`` on the delivered order; see ``credit``."""
        from ratepay_oms.plugins.ratepay.adjustments import book

        return book(self, "debit", order_ref, amount, tax_rate=tax_rate, reason=reason, now=now)

    # -- the tick --------------------------------------------------------------------------

    def tick(
        self,
        *,
        now: datetime | None = None,
        limit: int | None = None,
        progress: Callable[[int], None] | None = None,
        concurrency: int | None = None,
    ) -> TickResult:
        """Do all due work: open intents, retries, timeouts, on-enter leftovers, event-less
        transitions; then deliver the state-change notifications that are due.
        ``concurrency`` (default: the engine's) gateway calls are in flight at once, at most
        one per order."""
        k = self.concurrency if concurrency is None else concurrency
        if k < 1:
            raise ValueError(f"concurrency must be at least 1, not {k}")
        started = time.perf_counter()
        moment = naive_utc(now)
        with span("ratepay_oms.tick", {"ratepay_oms.worker": self.worker_id}) as current:
            runner = TickRunner(self.context, self.leases, self.batch_size, k)
            result = runner.run(moment, limit=limit, progress=progress)
            delivered = self.deliver_notifications(now=moment)
            if current is not None:
                current.set_attribute("ratepay_oms.items_moved", result.items_moved)
        result = replace(
            result,
            notifications_delivered=delivered.delivered,
            notifications_failed=delivered.failed + delivered.dead,
        )
        instruments.tick_done(time.perf_counter() - started, result.items_moved)
        return result

    def deliver_notifications(self, *, now: datetime | None = None) -> DeliveryResult:
        """Send the state-change notifications that are due (the tick calls this); nothing
        without a configured URL. See ``ratepay_oms.engine.outbox``."""
        return OutboxDelivery(self._sessions, self.notifications, self.worker_id).deliver(now)

    # -- gateway-call intents -----------------------------------------------------------------

    def intents(self, order_ref: str | None = None, *, open_only: bool = True) -> list[IntentView]:
        """Gateway-call intents (default: the open ones: in flight, lost or unknown)."""
        with self._sessions() as session:
            order_id = self._find(session, order_ref).id if order_ref is not None else None
            return list_intents(session, order_id=order_id, open_only=open_only)

    def resolve_intent(
        self, intent_id: int, *, booked: bool, note: str = "", now: datetime | None = None
    ) -> TriggerResult:
        """Settle an open intent by a person's word after checking at the gateway.

        ``booked`` applies it as a success (the items move on); otherwise the items are
        retried at once, which sends the call again.
        """
        stats = RunStats()

        def settle(runner: Runner) -> None:
            session = runner.session
            intent = session.get(Intent, intent_id)
            if intent is None:
                raise IntentError(f"no intent {intent_id}")
            if intent.status not in INTENT_OPEN_STATUSES:
                raise IntentError(
                    f"intent {intent_id} is already settled ({intent.resolution}); nothing to do"
                )
            self.claims.lock_one(session, intent.order_id, f"intent {intent_id}: its order")
            verdict = Reconciled(booked, None, f"resolved by a person: {note}".rstrip(": "))
            resolution = RESOLVED_BOOKED if booked else RESOLVED_NOT_BOOKED
            runner.settle(intent_id, verdict, resolution, note=verdict.detail)

        self._drive(naive_utc(now), stats).run(settle)
        return _trigger_result("resolve", stats)

    # -- checkout ----------------------------------------------------------------------------

    def calculate_installment(
        self,
        amount: Decimal,
        *,
        months: int | None = None,
        rate: Decimal | None = None,
        payment_firstday: int | None = DEFAULT_PAYMENT_FIRSTDAY,
    ) -> Any:
        """The instalment plan for ``amount`` (the basket amount) by ``months`` or by ``rate``,
        for the shop's checkout: the plan an INSTALLMENT order with the same choice sends.

        Delegates to the ``installments`` service the RatePAY plugin registers (its
        ``InstallmentQuote``: ``plan``, ``adjusted``, ``notice``, ``details``); raises its
        ``InstallmentUnavailable`` when RatePAY offers no usable plan.
        """
        calculator = self.services.get(INSTALLMENT_SERVICE)
        if calculator is None:
            raise EngineConfigError(
                "no instalment calculator configured: set the RATEPAY_* settings (the RatePAY "
                "plugin registers services['installments'])"
            )
        return calculator(amount, months=months, rate=rate, payment_firstday=payment_firstday)

    # -- queries ---------------------------------------------------------------------------

    @staticmethod
    def _find(session: Session, order_ref: str) -> Order:
        order = session.scalar(select(Order).where(Order.order_ref == order_ref))
        if order is None:
            raise OrderNotFoundError(f"no order {order_ref!r}")
        return order

    def order(self, order_ref: str) -> OrderView:
        with self._sessions() as session:
            order = self._find(session, order_ref)
            # Rows, not ORM objects: the view copies them anyway (10,000 items: a tenth of it);
            # in the view's field order and sorted by the database, so each becomes a view
            # positionally.
            table = cast(Table, OrderItem.__table__)
            rows = session.execute(
                select(*(table.c[name] for name in ITEM_VIEW_FIELDS))
                .where(table.c.order_id == order.id)
                .order_by(table.c.id)
            )
            return OrderView.of_views(order, [ItemView.from_values(row) for row in rows])

    def orders(self, *, state: str | None = None, process: str | None = None) -> list[OrderView]:
        """Orders (oldest first), optionally only those of ``process`` or with an item in
        ``state``."""
        with self._sessions() as session:
            query = select(Order).order_by(Order.id)
            if process is not None:
                query = query.where(Order.process == process)
            if state is not None:
                query = query.where(
                    Order.id.in_(select(OrderItem.order_id).where(OrderItem.state == state))
                )
            orders = list(session.scalars(query))
            by_order: dict[int, list[OrderItem]] = {o.id: [] for o in orders}
            if orders:
                item_query = select(OrderItem).order_by(OrderItem.id)
                if process is not None or state is not None:
                    item_query = item_query.where(OrderItem.order_id.in_(list(by_order)))
                for item in session.scalars(item_query):
                    if item.order_id in by_order:
                        by_order[item.order_id].append(item)
            return [OrderView.of(o, by_order[o.id]) for o in orders]

    def history(self, order_ref: str) -> list[HistoryEntry]:
        with self._sessions() as session:
            order = self._find(session, order_ref)
            rows = session.execute(
                select(StateHistory, OrderItem.sku)
                .join(OrderItem, OrderItem.id == StateHistory.item_id)
                .where(StateHistory.order_id == order.id)
                .order_by(StateHistory.id)
            )
            return [
                HistoryEntry(
                    h.item_id, sku, h.from_state, h.to_state, h.event, h.created_at,
                    forced=bool(h.forced), actor=h.actor, reason=h.reason,
                    data=json.loads(h.data) if h.data else None,
                )
                for h, sku in rows
            ]

    def transition_log(self, order_ref: str) -> list[TransitionLogEntry]:
        with self._sessions() as session:
            order = self._find(session, order_ref)
            rows = session.scalars(
                select(TransitionLog)
                .where(TransitionLog.order_id == order.id)
                .order_by(TransitionLog.id)
            )
            return [TransitionLogEntry.of(r) for r in rows]


def _insert_items(
    session: Session,
    order: Order,
    order_input: OrderInput,
    definition: ProcessDefinition,
    now: datetime,
) -> list[OrderItem]:
    """One item row per unit, in the initial state, and the rows as ORM objects (ordered by
    id, set as ``order.items`` so the commands that read them do not load them again).

    A line of 10,000 units is one parameter set repeated, sent as one Core executemany
    (SQLAlchemy's insertmanyvalues: a few multi-row INSERTs), then read back in one query:
    one ORM object and flush per unit cost ten times that."""
    rows = []
    for line_no, line in enumerate(order_input.items):
        unit = {
            "order_id": order.id,
            "line_no": line_no,
            "sku": line.sku,
            "name": line.name,
            "unit_price_gross": line.unit_price_gross,
            "tax_rate": line.tax_rate,
            "discount": line.discount,
            "process": definition.name,
            "state": definition.initial,
            "state_entered_at": now,
            "attempts": 0,
        }
        rows.extend([unit] * line.quantity)
    session.execute(insert(cast(Table, OrderItem.__table__)), rows)
    items = list(
        session.scalars(
            select(OrderItem).where(OrderItem.order_id == order.id).order_by(OrderItem.id)
        )
    )
    set_committed_value(order, "items", list(items))
    return items


def _dump(data: Mapping[str, Any]) -> str:
    import json

    return json.dumps(data, ensure_ascii=False, sort_keys=True)


def _event_data(data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A manual event's data as a JSON object, or ``ManualEventError`` (nothing written)."""
    if data is None or not data:
        return None
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and k for k in data):
        raise ManualEventError("event data must be an object with text keys")
    try:
        return dict(json.loads(json.dumps(dict(data), default=str)))
    except (TypeError, ValueError) as exc:
        raise ManualEventError(f"event data cannot be stored as JSON: {exc}") from None


def _duplicate(order_ref: str) -> OrderInputError:
    return OrderInputError(f"order_ref: an order {order_ref!r} exists already")


def _select_for_event(
    definition: ProcessDefinition,
    order_ref: str,
    event: str,
    items: Sequence[OrderItem],
    item_ids: Sequence[int] | None,
) -> list[OrderItem]:
    """The items a manual ``event`` applies to, or ``ManualEventError`` saying why none/not."""
    event_def = definition.events.get(event)
    if event_def is None:
        manual = sorted(n for n, e in definition.events.items() if e.manual)
        raise ManualEventError(
            f"unknown event {event!r} in process {definition.name} "
            f"(manual events: {', '.join(manual) or 'none'})"
        )
    if not event_def.manual:
        how = (
            "on entering its state"
            if event_def.on_enter
            else "by its timeout"
            if event_def.timeout is not None
            else "by the engine"
        )
        raise ManualEventError(
            f"event {event!r} is not manual in process {definition.name}: it fires {how}"
        )

    def accepts(item: OrderItem) -> str:
        names = definition.manual_events(item.state)
        return ", ".join(names) if names else "no manual event"

    def waiting(item: OrderItem) -> str:
        return (
            f"item {item.id} waits for the outcome of gateway call intent {item.intent_id} "
            "(see 'ratepay-oms intents list')"
        )

    if item_ids is None:
        chosen = [i for i in items if event in definition.events_from(i.state)]
        blocked = [i for i in chosen if i.intent_id is not None]
        if blocked:
            raise ManualEventError(f"cannot fire {event!r}: " + "; ".join(map(waiting, blocked)))
        if not chosen:
            states = sorted({i.state for i in items})
            detail = "; ".join(
                f"{s}: accepts {accepts(next(i for i in items if i.state == s))}" for s in states
            )
            raise ManualEventError(
                f"no item of order {order_ref} is in a state that accepts {event!r} ({detail})"
            )
        return chosen
    by_id = {i.id: i for i in items}
    problems: list[str] = []
    chosen = []
    for item_id in dict.fromkeys(item_ids):
        item = by_id.get(item_id)
        if item is None:
            problems.append(f"item {item_id} is not an item of order {order_ref}")
        elif event not in definition.events_from(item.state):
            problems.append(f"item {item_id} is in {item.state!r}, which accepts {accepts(item)}")
        elif item.intent_id is not None:
            problems.append(waiting(item))
        else:
            chosen.append(item)
    if problems:
        raise ManualEventError(f"cannot fire {event!r}: " + "; ".join(problems))
    return chosen


def _trigger_result(event: str, stats: RunStats) -> TriggerResult:
    """What a drive for one manual event (or booking, or resolution) did, as a snapshot."""
    return TriggerResult(
        event=event,
        moved=list(stats.moves),
        stayed=list(stats.stayed),
        errors=list(stats.error_messages),
        held=list(stats.held),
    )
