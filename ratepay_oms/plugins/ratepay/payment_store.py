"""Reading and writing the RatePAY payment data of an order through the engine's session.

Commands call these with ``ctx.session``: what they write commits in the same transaction as
the items' state change (or is rolled back with it when the command raises), so an outcome
can never exist without its state or the other way round.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, NoReturn, cast
from weakref import WeakKeyDictionary

from sqlalchemy import (
    Integer,
    Row,
    Table,
    bindparam,
    event,
    func,
    insert,
    join,
    literal_column,
    null,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session, SessionTransaction, make_transient, make_transient_to_detached
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from ratepay_oms.engine.persist import (
    chunked,
    ids_clause,
    ids_style,
    ids_value,
    prebuilt,
)
from ratepay_oms.orders import OrderInput, parse_order
from ratepay_oms.persistence.models import Order, OrderItem, StateHistory
from ratepay_oms.persistence.payment import (
    CANCELLATION,
    DELIVERY,
    OPEN,
    PAYMENT_REQUEST,
    RETURN,
    RatepayItemOutcome,
    RatepayPayment,
)
from ratepay_oms.persistence.statements import execute_rowless
from ratepay_oms.plugins.ratepay.basket import PRORATA, OrderLedger, Unit, voucher_shares
from ratepay_oms.ratepay import InstallmentPlan, Operation, RatepayResult

PAYMENT_REQUEST_OPERATION = Operation.PAYMENT_REQUEST.value

log = logging.getLogger(__name__)


def order_input(order: Order) -> OrderInput:
    """The order document stored at ``place_order`` (already checked then)."""
    data = order.data
    if isinstance(data, str):
        data = json.loads(data, parse_float=Decimal)
    return parse_order(data)


def units(items: Iterable[OrderItem]) -> list[Unit]:
    return [
        Unit(
            item_id=i.id,
            line_no=i.line_no,
            sku=i.sku,
            name=i.name,
            unit_price_gross=i.unit_price_gross,
            tax_rate=i.tax_rate,
            discount=i.discount or Decimal("0.00"),
        )
        for i in items
    ]


OUTCOME_CHUNK = 1000
"""Item ids per ``INSERT … SELECT`` of outcome rows (well under every bind limit)."""

_PAYMENTS = "ratepay.payments"
"""``Session.info`` key: (transaction, {order id: its payment row as loaded in it, or
``None`` when it had none})."""


def get_payment(session: Session, order: Order) -> RatepayPayment | None:
    """The order's payment row. Kept per session: a settling transaction asks in ``apply`` and
    again in the next command's ``plan``; the second ask would return the very same object
    from the identity map after a SELECT (the ORM does not overwrite loaded attributes), so it
    is answered from the session unless the object left it (a savepoint that added it was
    rolled back).

    Across transactions, like the order and items a settle takes up (``Runner._take_up``):
    when ``order`` is the very object a committed transaction of this worker loaded or wrote
    the payment row with (:func:`_taken_up`), that object is taken into this session instead
    of read again."""
    known = _known(session)
    answered, payment = _without_statement(session, order, known)
    if not answered:
        payment = session.scalar(_PAYMENT_OF_ORDER, {"order_id": order.id})
        _remember(order, payment)
    known[order.id] = payment
    return payment


def _known(session: Session) -> dict[int, RatepayPayment | None]:
    """:func:`get_payment`'s answers in the session's open transaction."""
    transaction = session.get_transaction()
    kept = session.info.get(_PAYMENTS)
    if kept is None or kept[0] is not transaction:  # only within one transaction
        kept = session.info[_PAYMENTS] = (transaction, {})
    known: dict[int, RatepayPayment | None] = kept[1]
    return known


def _without_statement(
    session: Session, order: Order, known: dict[int, RatepayPayment | None]
) -> tuple[bool, RatepayPayment | None]:
    """``(True, the order's payment row or None)`` when known without asking the database,
    else ``(False, None)``."""
    if order.id in known:
        payment = known[order.id]
        if payment is None:
            return True, None  # asked before in this transaction: none (only we add one)
        state = instance_state(payment)
        if state.persistent and state.session is session:
            return True, payment
    payment = _taken_up(session, order)
    return (True, payment) if payment is not None else (False, None)


_LAST_WRITTEN: WeakKeyDictionary[Order, RatepayPayment] = WeakKeyDictionary()
"""Per order object, its payment row's object as this worker last loaded or wrote it (kept
while the order object lives: a chain's calls carry their order, ``Call.loaded``)."""
_LAST_WRITTEN_LOCK = threading.Lock()
"""The pool's threads share :data:`_LAST_WRITTEN` (each works on orders of its own)."""


def _remember(order: Order, payment: RatepayPayment | None) -> None:
    with _LAST_WRITTEN_LOCK:
        if payment is None:
            _LAST_WRITTEN.pop(order, None)
        else:
            _LAST_WRITTEN[order] = payment


def _taken_up(session: Session, order: Order) -> RatepayPayment | None:
    """The payment object kept for ``order`` (see :data:`_LAST_WRITTEN`), added to
    ``session`` without a statement; ``None`` when a SELECT must answer.

    Only when ``order`` itself was taken into this session (a settle of this worker's own
    call: the order's lease kept every other writer off it since that transaction
    committed) and the payment object left a session that committed it: detached, every
    attribute loaded (a rolled-back transaction expires them; an object a rolled-back
    transaction or savepoint added is transient, not detached)."""
    with _LAST_WRITTEN_LOCK:
        payment = _LAST_WRITTEN.get(order)
    if payment is None:
        return None
    order_state = instance_state(order)
    if not order_state.persistent or order_state.session is not session:
        return None
    state = instance_state(payment)
    if (
        not state.detached
        or state.expired_attributes
        or state.unloaded
        or state.key is None
        or state.key in session.identity_map
    ):
        return None
    session.add(payment)
    return payment


_PAYMENT_OF_ORDER = select(RatepayPayment).where(
    RatepayPayment.order_id == bindparam("order_id", type_=Integer)
)
"""The order's payment row (``:order_id``), one statement object for every call: built anew
per call it cost its construction and cache key, twice per order."""


def _keep(session: Session, order: Order, payment: RatepayPayment) -> None:
    """``payment`` (just added) is the order's row for ``get_payment`` from now on."""
    kept = session.info.get(_PAYMENTS)
    if kept is not None and kept[0] is session.get_transaction():
        kept[1][payment.order_id] = payment
    _remember(order, payment)


def claim_payment(
    session: Session,
    order: Order,
    method: str,
    now: datetime,
    *,
    profile: str | None = None,
    voucher_rule: str | None = None,
) -> tuple[RatepayPayment, bool]:
    """Write the order's payment row unless it has one: ``(the new row, True)``; else
    ``(the row it has, False)``, unchanged (``ensure_payment`` changes it).

    The PAYMENT_REQUEST plan of every order starts here, and on its first plan the order has
    no row: one ``INSERT … SELECT … WHERE NOT EXISTS (the order's row) RETURNING id`` writes it
    where a SELECT that found nothing and the ORM's INSERT did before, and only an order that
    had a row reads it (a retry). Two writers of one order's row can only meet when its lease
    is broken: then both may see none, and the unique ``order_id`` fails the second INSERT,
    which rolls its plan's savepoint back, as when the ORM wrote it.

    The new row's object is added to the session as loaded (every column as written). A
    rollback of the savepoint or transaction that wrote it takes it out again
    (:func:`_forget_rolled_back`): the ORM does that only for the objects it flushed itself."""
    known = _known(session)
    _answered, payment = _without_statement(session, order, known)
    if payment is not None:
        return payment, False
    order_id = order.id
    params = {"v_order_id": order_id, "v_method": method, "v_profile": profile,
              "v_voucher_rule": voucher_rule, "v_now": now}
    conn = session.connection()
    if conn.dialect.insert_returning:
        new_id = conn.execute(_CLAIM_RETURNING, params).scalar()
    else:
        written = execute_rowless(conn, _CLAIM, params)
        new_id = written.lastrowid if written.rowcount == 1 else None
    if new_id is None:  # it has one (a retry): read it
        payment = session.scalar(_PAYMENT_OF_ORDER, {"order_id": order.id})
        assert payment is not None  # rows are never deleted but with their order
        known[order.id] = payment
        _remember(order, payment)
        return payment, False
    payment = _loaded_payment({
        "id": new_id, "order_id": order_id, "method": method, **_CLAIM_CONSTANTS,
        "profile": profile, "voucher_rule": voucher_rule, "created_at": now, "updated_at": now,
    })
    session.add(payment)
    root = session.get_transaction()
    written_in = session.get_nested_transaction() or root
    inserted = [e for e in session.info.get(_INSERTED, ()) if e[0] is root]
    inserted.append((root, written_in, order, payment))
    session.info[_INSERTED] = inserted
    _keep(session, order, payment)
    return payment, True


_CLAIM_CONSTANTS: dict[str, Any] = {
    "transaction_id": None,
    "transaction_short_id": None,
    "descriptor": None,
    "result_code": None,
    "reason_code": None,
    "customer_message": None,
    "installment_plan": None,
    "shipping_status": OPEN,
    "discount_status": OPEN,
}
"""The columns of a new payment row that are the same for every order: in the text of
:data:`_CLAIM` as constants, not sent as parameters with every claim."""

_CLAIM_PARAMS = {"order_id": "v_order_id", "method": "v_method", "profile": "v_profile",
                 "voucher_rule": "v_voucher_rule", "created_at": "v_now", "updated_at": "v_now"}
"""The other columns of a new payment row and the parameters that give them."""


def _loaded_payment(values: dict[str, Any]) -> RatepayPayment:
    """A payment object holding ``values`` (every column) as loaded from its row, not yet in
    a session: the values go straight into the object's state, as the ORM's loader puts them
    (the constructor sends every attribute through the attribute events, ~150 calls for
    what is a dozen dictionary items here)."""
    payment: RatepayPayment = _PAYMENT_MANAGER.new_instance()
    instance_state(payment).dict.update(values)
    make_transient_to_detached(payment)  # as if loaded: persistent once added, no INSERT
    return payment


_PAYMENT_MANAGER = cast(Any, RatepayPayment).__mapper__.class_manager


def _claim_statement() -> Any:
    """``INSERT INTO ratepay_payment (…) SELECT :v_order_id, … WHERE NOT EXISTS (SELECT id
    FROM ratepay_payment WHERE order_id = :v_order_id)``, one statement object for every
    call."""
    table = cast(Table, RatepayPayment.__table__)
    columns = [c.name for c in table.columns if c.name != "id"]
    assert set(columns) == set(_CLAIM_CONSTANTS) | set(_CLAIM_PARAMS), "a column unaccounted"
    order_id = bindparam("v_order_id", type_=table.c.order_id.type)
    values = [
        bindparam(_CLAIM_PARAMS[name], type_=table.c[name].type) if name in _CLAIM_PARAMS
        else _constant(_CLAIM_CONSTANTS[name], table.c[name].type)
        for name in columns
    ]
    has_one = select(table.c.id).where(table.c.order_id == order_id).exists()
    return insert(table).from_select(columns, select(*values).where(~has_one))


def _constant(value: str | None, type_: Any) -> Any:
    """``value`` written into a statement's text (a fixed word of this module, never data)."""
    if value is None:
        return null()
    assert value.isidentifier(), value
    return literal_column(f"'{value}'", type_)


_CLAIM = _claim_statement()
_CLAIM_RETURNING = _claim_statement().returning(RatepayPayment.__table__.c.id)

_INSERTED = "ratepay.inserted_payments"
"""``Session.info`` key: ``[(transaction, transaction or savepoint, order, payment)]``, the
rows :func:`claim_payment` wrote in the session's open transaction, and their objects."""


@event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    """A rolled-back savepoint or transaction took rows :func:`claim_payment` wrote in it:
    their objects leave the session and every memory of them (as the ORM's own rollback does
    with the objects it inserted), so nothing takes up or updates a row that is not there."""
    inserted = session.info.get(_INSERTED)
    if not inserted:
        return
    keep = []
    for entry in inserted:
        _root, written_in, order, payment = entry
        if _within(written_in, previous_transaction):
            _forget(session, order, payment)
        else:
            keep.append(entry)
    session.info[_INSERTED] = keep


def _within(transaction: SessionTransaction | None, outer: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is outer:
            return True
        transaction = transaction.parent
    return False


def _forget(session: Session, order: Order, payment: RatepayPayment) -> None:
    """Without reading an attribute of ``order``: the rollback expired them, and reading one
    would begin a new transaction."""
    if instance_state(payment).session is session:
        session.expunge(payment)
    make_transient(payment)
    with _LAST_WRITTEN_LOCK:
        if _LAST_WRITTEN.get(order) is payment:
            del _LAST_WRITTEN[order]
    kept = session.info.get(_PAYMENTS)
    if kept is not None:
        for order_id, known in list(kept[1].items()):
            if known is payment:
                del kept[1][order_id]


def ensure_payment(
    session: Session,
    order: Order,
    method: str,
    now: datetime,
    *,
    profile: str | None = None,
    voucher_rule: str | None = None,
) -> RatepayPayment:
    """The order's payment row; a new PAYMENT_REQUEST attempt may move it to another profile
    (the old transaction is dead then), and fixes the voucher rule while nothing is booked."""
    payment = get_payment(session, order)
    if payment is None:
        # Every column given (the INSERT writes them all either way): an attribute never set
        # stays unloaded after the flush, and the object could not be taken up by the settle
        # of this order's call (``_taken_up``), which would read the row again.
        payment = RatepayPayment(
            order_id=order.id,
            method=method,
            transaction_id=None,
            transaction_short_id=None,
            descriptor=None,
            result_code=None,
            reason_code=None,
            customer_message=None,
            installment_plan=None,
            profile=None,
            voucher_rule=None,
            shipping_status=OPEN,
            discount_status=OPEN,
            created_at=now,
            updated_at=now,
        )
        session.add(payment)
    if profile is not None:
        payment.profile = profile
    if voucher_rule is not None:
        payment.voucher_rule = voucher_rule
    session.flush()
    _keep(session, order, payment)
    return payment


def write_payment(session: Session, payment: RatepayPayment, values: dict[str, Any]) -> None:
    """Set ``values`` (column name → value) on the order's payment row by one Core UPDATE, and
    on ``payment`` as what the database holds.

    A settling ``apply`` changes a handful of columns of one row; the unit of work (history of
    every attribute, a flush) cost more CPU than the UPDATE. The object must stay what the row
    holds (the next command's ``plan`` and the settle of the next call take it up without a
    statement, :func:`get_payment`), hence ``set_committed_value``. Only where no savepoint
    can be rolled back alone after it (``apply``: a failure rolls the whole transaction back,
    and that expires every object of the session, this one included); inside a ``plan``,
    whose savepoint may be rolled back alone, set the attributes instead."""
    statement = _PAYMENT_UPDATES.get(tuple(values))
    if statement is None:
        statement = _PAYMENT_UPDATES.setdefault(tuple(values), _payment_update(tuple(values)))
    params = {f"v_{name}": value for name, value in values.items()}
    params["payment_id"] = payment.id
    written = execute_rowless(session.connection(), statement, params).rowcount
    if written != 1:
        _stale_payment(payment, written)
    _payment_written(payment, values)


def _stale_payment(payment: RatepayPayment, written: int) -> NoReturn:
    raise StaleDataError(
        f"ratepay_payment {payment.id} (order {payment.order_id}): {written} rows updated"
    )


def _payment_written(payment: RatepayPayment, values: dict[str, Any]) -> None:
    """``payment`` holds ``values`` as what the database holds (see :func:`write_payment`)."""
    state = instance_state(payment)
    if state.committed_state or state.expired_attributes:
        for name, value in values.items():
            set_committed_value(payment, name, value)
    else:  # nothing pending or expired: what set_committed_value does, minus its machinery
        state.dict.update(values)


_PAYMENT_UPDATES: dict[tuple[str, ...], Any] = {}
"""One UPDATE statement per set of columns :func:`write_payment` is given (a handful), built
once: building and caching a statement per call cost as much as running it."""


def _payment_update(columns: tuple[str, ...]) -> Any:
    table = cast(Table, RatepayPayment.__table__)
    return (
        update(table)
        .where(table.c.id == bindparam("payment_id", type_=Integer))
        .values({name: bindparam(f"v_{name}", type_=table.c[name].type) for name in columns})
    )


def plan_json(plan: InstallmentPlan) -> str:
    return json.dumps({k: str(v) for k, v in asdict(plan).items()}, sort_keys=True)


def record_outcomes(
    session: Session,
    order: Order,
    items: Sequence[OrderItem],
    action: str,
    now: datetime,
    *,
    result: RatepayResult | None = None,
    success: bool | None = None,
    message: str | None = None,
    operation: str | None = None,
    subtype: str | None = None,
    transaction_id: str | None = None,
    result_code: str | None = None,
    reason_code: str | None = None,
    payment: tuple[RatepayPayment, dict[str, Any]] | None = None,
) -> Sequence[WrittenOutcome] | None:
    """One outcome row per item; without ``result`` the call was not made (``message`` says
    why) and the outcome is a failure. ``payment``: the order's payment row and the values a
    settle writes on it (:func:`write_payment`), written first; on PostgreSQL by the same
    statement as the outcomes (a data-modifying CTE: one round trip and one statement
    execution fewer per settle), whose rows come only if the payment row was there to update.

    Every value but the item's id is the same for all rows, so they are written inside the
    database by ``INSERT … SELECT`` from the items (by chunks of ids), one prebuilt statement
    whatever the group's size, and come back as :class:`WrittenOutcome` tuples for the group's
    conditions (:func:`prime_outcomes`) where the database returns the new ids (``INSERT …
    RETURNING``), else ``None`` (the conditions read them back). Nothing loads these rows as
    ORM objects in the same transaction (the conditions and the ledger read them by queries
    of their own, after the flush here): building an object per row, or one parameter set
    per row for an executemany, cost more CPU than the rows (an order's four items: a
    fifth less CPU than the executemany, measured on each of the three dialects).
    """
    ok = bool(result.success) if success is None and result is not None else bool(success)
    text = message
    if text is None and result is not None:
        parts = [p for p in (result.result_text, result.reason_text) if p]
        text = " / ".join(parts) or None
    same: dict[str, Any] = {
        "action": action,
        "success": ok,
        "operation": (result.operation if result is not None else operation) or action,
        "subtype": result.subtype if result is not None else subtype,
        "result_code": result_code if result is None
        else None if result.result_code is None
        else str(result.result_code),
        "reason_code": reason_code if result is None
        else None if result.reason_code is None
        else str(result.reason_code),
        "message": text,
        "transaction_id": (result.transaction_id if result is not None else None)
        or transaction_id,
        "created_at": now,
    }
    if payment is not None and items and len(items) <= OUTCOME_CHUNK:
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            return _insert_outcomes_paying(session, order, items, same, *payment)
    if payment is not None:
        write_payment(session, *payment)
    if not items:
        return []
    return _insert_outcomes_from_items(session, order, items, same)


class WrittenOutcome(NamedTuple):
    """An outcome row as written set-based: its id and item from the database, every other
    value the one it was written with (the same for the whole group). Read only, as a row."""

    id: int
    item_id: int
    order_id: int
    action: str
    success: bool
    operation: str
    subtype: str | None
    result_code: str | None
    reason_code: str | None
    message: str | None
    transaction_id: str | None
    created_at: datetime


def _insert_outcomes_from_items(
    session: Session, order: Order, items: Sequence[OrderItem], same: dict[str, Any]
) -> list[WrittenOutcome] | None:
    """The rows by ``INSERT … SELECT`` per chunk of ids; with ``RETURNING`` (where the
    database has it) their ids come back per item, and the rows for the group's conditions
    are built from those and ``same`` instead of being read back (the read-back of 10,000
    rows was a twentieth of placing a 10,000-unit order).

    One statement object for every call (built once per dialect style, every value a named
    parameter, the ids one parameter where the database takes a list as one: see
    ``ratepay_oms.engine.persist``): an ``IN`` list of a thousand literal ids was built,
    coerced and rendered anew for every chunk."""
    session.flush()
    conn = session.connection()
    returning = conn.dialect.insert_returning
    style = ids_style(session)
    statement = prebuilt(
        "outcomes returning" if returning else "outcomes", style,
        _outcomes_returning if returning else _outcomes_statement,
    )
    params = {f"v_{name}": value for name, value in same.items()}
    params["v_order_id"] = order.id
    written: list[WrittenOutcome] = []
    # Positionally (``same`` is in the tuple's field order; checked once here, not per row).
    assert tuple(same) == WrittenOutcome._fields[3:], "outcome values out of field order"
    rest = (order.id, *same.values())
    make = WrittenOutcome._make
    for part in chunked(sorted([item.id for item in items]), OUTCOME_CHUNK):
        result = conn.execute(statement, {**params, "ids": ids_value(part, style)})
        if returning:  # all rows at once: iterating the result fetches row by row
            written.extend([make((outcome_id, item_id, *rest)) for outcome_id, item_id
                            in result.all()])
    return written if returning else None


def _insert_outcomes_paying(
    session: Session,
    order: Order,
    items: Sequence[OrderItem],
    same: dict[str, Any],
    payment: RatepayPayment,
    values: dict[str, Any],
) -> list[WrittenOutcome]:
    """PostgreSQL: :func:`write_payment` and :func:`_insert_outcomes_from_items` (one chunk)
    as one statement (:func:`_outcomes_paying`)."""
    session.flush()
    columns = tuple(values)
    statement = _PAYING.get(columns)
    if statement is None:
        statement = _PAYING.setdefault(columns, _outcomes_paying(columns))
    params = {f"v_{name}": value for name, value in same.items()}
    params["v_order_id"] = order.id
    params.update({f"p_{name}": value for name, value in values.items()})
    params["payment_id"] = payment.id
    params["ids"] = ids_value(sorted([item.id for item in items]), "array")
    rows = session.connection().execute(statement, params).all()
    if not rows:  # no payment row was updated, so no outcome was written either
        _stale_payment(payment, 0)
    _payment_written(payment, values)
    rest = (order.id, *same.values())
    make = WrittenOutcome._make
    return [make((outcome_id, item_id, *rest)) for outcome_id, item_id in rows]


_PAYING: dict[tuple[str, ...], Any] = {}
""":func:`_outcomes_paying` per set of payment columns, built once."""


def _outcomes_paying(columns: tuple[str, ...]) -> Any:
    """``WITH paid AS (UPDATE ratepay_payment SET … WHERE id = :payment_id RETURNING id)
    INSERT INTO ratepay_item_outcome (…) SELECT … FROM oms_order_item CROSS JOIN paid WHERE
    id = ANY(:ids) ORDER BY id RETURNING id, item_id``: the payment's values as ``p_…``
    (some share a name with an outcome's ``v_…``), the rows only when the payment row was
    there. The two touch different tables; the CTE runs to completion either way."""
    payments = cast(Table, RatepayPayment.__table__)
    paid = (
        update(payments)
        .where(payments.c.id == bindparam("payment_id", type_=Integer))
        .values({n: bindparam(f"p_{n}", type_=payments.c[n].type) for n in columns})
        .returning(payments.c.id)
        .cte("paid")
    )
    table = cast(Table, RatepayItemOutcome.__table__)
    return (
        _outcomes_statement("array", paid)
        .returning(table.c.id, table.c.item_id)
        .add_cte(paid)
    )


_OUTCOME_VALUES = WrittenOutcome._fields[3:]
"""The columns of an outcome row that are the same for a whole call (after its ids)."""


def _outcomes_statement(style: str, paid: Any = None) -> Any:
    """``INSERT INTO ratepay_item_outcome (item_id, order_id, …) SELECT id, :v_order_id, …
    FROM oms_order_item WHERE id IN :ids ORDER BY id``; ``paid``: a CTE the items are
    joined with (:func:`_outcomes_paying`), so that no row comes when it has none."""
    table = cast(Table, RatepayItemOutcome.__table__)
    columns = ["item_id", "order_id", *_OUTCOME_VALUES]
    values = [
        OrderItem.id,
        *(bindparam(f"v_{name}", type_=table.c[name].type) for name in columns[1:]),
    ]
    rows = select(*values)
    if paid is not None:
        rows = rows.select_from(join(cast(Table, OrderItem.__table__), paid, true()))
    return insert(table).from_select(
        columns, rows.where(ids_clause(OrderItem.id, style)).order_by(OrderItem.id)
    )


def _outcomes_returning(style: str) -> Any:
    table = cast(Table, RatepayItemOutcome.__table__)
    return _outcomes_statement(style).returning(table.c.id, table.c.item_id)


Outcome = RatepayItemOutcome | WrittenOutcome | Row[Any]
"""An outcome as the conditions see it: the object or row ``apply`` just wrote, or a row read
back (the same attribute names, read only)."""

OUTCOMES_MEMO = "ratepay.latest_outcomes"
"""``CommandContext.memo`` key (with order id and action) of the newest outcome per item."""


def prime_outcomes(
    memo: dict[Any, Any],
    order: Order,
    action: str,
    outcomes: Sequence[RatepayItemOutcome | WrittenOutcome] | None,
) -> None:
    """Tell the conditions of this group what ``apply`` just recorded: the newest outcome of
    ``action`` for each of the group's items (the rows are in the session, ids flushed), so
    they need not read them back. Only for outcomes written in the settling transaction
    without a savepoint around them (``apply``), checked with that same context."""
    if outcomes is None:  # written set-based: the conditions read them back
        memo.pop((OUTCOMES_MEMO, order.id, action), None)
        return
    memo[(OUTCOMES_MEMO, order.id, action)] = {o.item_id: o for o in outcomes}


def payment_attempts(session: Session, order_id: int, since: datetime) -> list[datetime]:
    """When this order's PAYMENT_REQUESTs went out since ``since``: one per transaction (a
    request refused before it was sent, e.g. a failed PAYMENT_INIT, has none and counts not)."""
    rows = session.execute(
        select(RatepayItemOutcome.transaction_id, func.min(RatepayItemOutcome.created_at))
        .where(
            RatepayItemOutcome.order_id == order_id,
            RatepayItemOutcome.action == PAYMENT_REQUEST,
            RatepayItemOutcome.operation == PAYMENT_REQUEST_OPERATION,
            RatepayItemOutcome.transaction_id.is_not(None),
            RatepayItemOutcome.created_at >= since,
        )
        .group_by(RatepayItemOutcome.transaction_id)
    ).all()
    return sorted(when for _, when in rows)


def latest_outcome(session: Session, item_id: int, action: str) -> RatepayItemOutcome | None:
    """The newest outcome of ``action`` for one item: what the last command said about it."""
    return session.scalar(
        select(RatepayItemOutcome)
        .where(RatepayItemOutcome.item_id == item_id, RatepayItemOutcome.action == action)
        .order_by(RatepayItemOutcome.id.desc())
        .limit(1)
    )


def latest_outcomes(session: Session, order_id: int, action: str) -> dict[int, Outcome]:
    """The newest outcome of ``action`` for every item of one order that has one, in one
    query: conditions check a whole group's items with this instead of one query each."""
    newest = (
        select(func.max(RatepayItemOutcome.id))
        .where(RatepayItemOutcome.order_id == order_id, RatepayItemOutcome.action == action)
        .group_by(RatepayItemOutcome.item_id)
    )
    # Rows, not ORM objects (same attribute names; read only): a big order's 10,000
    # outcomes are read once per group, and identity-mapping each cost more than the query.
    table = cast(Table, RatepayItemOutcome.__table__)
    rows = session.execute(select(table).where(table.c.id.in_(newest)))
    return {row.item_id: row for row in rows}


def load_ledger(session: Session, order: Order) -> OrderLedger:
    """Our ledger of the order: item units RatePAY confirmed as delivered / cancelled /
    returned (successful outcome rows), and the special positions' status."""
    all_items = set(session.scalars(select(OrderItem.id).where(OrderItem.order_id == order.id)))
    rows = session.execute(
        select(RatepayItemOutcome.item_id, RatepayItemOutcome.action).where(
            RatepayItemOutcome.order_id == order.id,
            RatepayItemOutcome.success.is_(True),
            RatepayItemOutcome.action.in_((DELIVERY, CANCELLATION, RETURN)),
        )
    ).all()
    ledger = OrderLedger(all_items=all_items)
    for item_id, action in rows:
        {DELIVERY: ledger.delivered, CANCELLATION: ledger.cancelled, RETURN: ledger.returned}[
            action
        ].add(item_id)
    payment = get_payment(session, order)
    if payment is not None:
        ledger.shipping_status = payment.shipping_status
        ledger.discount_status = payment.discount_status
        if payment.voucher_rule == PRORATA:
            data = order_input(order)
            ledger.voucher_rule = PRORATA
            if data.discount is not None:
                ledger.voucher_shares = voucher_shares(
                    data.discount.unit_price_gross, units(order.items)
                )
    return ledger


def latest_event_data(session: Session, item_ids: Sequence[int]) -> dict[str, Any] | None:
    """The newest data a person gave with a manual event that moved one of these items (what
    the delivery confirmation after ``ship --invoice-id …`` sends), or ``None``."""
    if not item_ids:
        return None
    raw = session.scalar(
        select(StateHistory.data)
        .where(StateHistory.item_id.in_(list(item_ids)), StateHistory.data.is_not(None))
        .order_by(StateHistory.id.desc())
        .limit(1)
    )
    return json.loads(raw) if raw else None
