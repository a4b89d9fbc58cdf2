"""The payment row of an order as the PAYMENT_REQUEST plan writes it (``claim_payment``): one
statement on the first plan, the row found on a retry, and a rolled-back savepoint or
transaction takes the row and its object along, on every dialect."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime

import pytest
from sqlalchemy import event, func, inspect, select

from ratepay_oms.demo import example_order
from ratepay_oms.engine.engine import Engine
from ratepay_oms.persistence.models import Order
from ratepay_oms.persistence.payment import RatepayPayment
from ratepay_oms.plugins.ratepay import payment_store as store
from ratepay_oms.process.loader import default_process_dir

NOW = datetime(2026, 3, 2, 12, 0, 0)


@pytest.fixture
def engine(fresh_db_url: str) -> Iterator[Engine]:
    """A database of its own: the orders here wait in ``new``, where a tick of another test
    on a shared database would take them up."""
    eng = Engine(fresh_db_url, process_dir=default_process_dir())
    eng.upgrade_db()
    yield eng
    eng.close()


def _order(engine: Engine) -> int:
    view = engine.place_order(example_order(f"PS-{uuid.uuid4().hex[:8]}"), fire=False)
    with engine.session() as s:
        return s.scalar(select(Order.id).where(Order.order_ref == view.order_ref))


def _rows(engine: Engine, order_id: int) -> int:
    with engine.session() as s:
        return s.scalar(
            select(func.count()).select_from(RatepayPayment)
            .where(RatepayPayment.order_id == order_id)
        )


def test_the_first_plan_writes_the_row_in_one_statement_a_retry_finds_it(engine) -> None:
    order_id = _order(engine)
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        statements.append(statement.split()[0].upper())

    event.listen(engine.db, "before_cursor_execute", count)
    try:
        with engine.session() as s, s.begin():
            order = s.get_one(Order, order_id)
            statements.clear()
            payment, new = store.claim_payment(s, order, "INVOICE", NOW, profile="DE",
                                               voucher_rule="prorata")
            assert new and statements == ["INSERT"]
            assert inspect(payment).persistent and not s.dirty and not s.new
            assert store.get_payment(s, order) is payment and statements == ["INSERT"]
        with engine.session() as s, s.begin():
            order = s.get_one(Order, order_id)
            statements.clear()
            again, new = store.claim_payment(s, order, "INVOICE", NOW, profile="CH")
            assert not new and again.id == payment.id and statements == ["INSERT", "SELECT"]
            assert (again.profile, again.voucher_rule, again.method) == ("DE", "prorata",
                                                                           "INVOICE")
            assert (again.shipping_status, again.created_at) == ("open", NOW)
    finally:
        event.remove(engine.db, "before_cursor_execute", count)
    assert _rows(engine, order_id) == 1


def test_a_rolled_back_savepoint_takes_the_row_and_its_object_along(engine) -> None:
    order_id = _order(engine)
    with engine.session() as s, s.begin():
        order = s.get_one(Order, order_id)
        savepoint = s.begin_nested()
        lost, new = store.claim_payment(s, order, "INVOICE", NOW)
        assert new
        savepoint.rollback()  # the plan failed after writing the row
        assert not inspect(lost).persistent and lost not in s
        assert store.get_payment(s, order) is None  # read again: not there
        with s.begin_nested():
            kept, new = store.claim_payment(s, order, "INVOICE", NOW)
        assert new and kept is not lost and inspect(kept).persistent
        assert store.get_payment(s, order) is kept
    assert _rows(engine, order_id) == 1


def test_a_rolled_back_transaction_takes_the_row_and_its_object_along(engine) -> None:
    order_id = _order(engine)
    with engine.session() as s:
        s.begin()
        order = s.get_one(Order, order_id)
        with s.begin_nested():
            lost, new = store.claim_payment(s, order, "INVOICE", NOW)
        assert new
        s.rollback()  # the transaction that planned failed as a whole
        assert not inspect(lost).persistent and lost not in s
        assert _rows(engine, order_id) == 0
        with s.begin():
            s.add(order)
            assert store.get_payment(s, order) is None  # not taken up from memory
            kept, new = store.claim_payment(s, order, "INVOICE", NOW)
            assert new and kept is not lost
    assert _rows(engine, order_id) == 1
    with engine.session() as s:
        assert s.get_one(RatepayPayment, kept.id).order_id == order_id


def test_a_settle_writes_the_payment_and_its_outcomes_together_or_neither(engine) -> None:
    """``record_outcomes(payment=…)``: the payment row's values and one outcome per item, on
    PostgreSQL in one statement; a payment row that is gone writes no outcome either and
    raises (the settle rolls back), on every dialect."""
    from sqlalchemy.orm.exc import StaleDataError

    from ratepay_oms.persistence.models import OrderItem
    from ratepay_oms.persistence.payment import RatepayItemOutcome

    order_id = _order(engine)
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        statements.append(" ".join(statement.split()[:2]).upper())

    with engine.session() as s, s.begin():
        order = s.get_one(Order, order_id)
        payment, _ = store.claim_payment(s, order, "INVOICE", NOW)
    event.listen(engine.db, "before_cursor_execute", count)
    try:
        with engine.session() as s, s.begin():
            order = s.get_one(Order, order_id)
            items = list(s.scalars(select(OrderItem).where(OrderItem.order_id == order_id)))
            payment = store.get_payment(s, order)
            statements.clear()
            written = store.record_outcomes(
                s, order, items, "payment_request", NOW, success=True, message="ok",
                payment=(payment, {"transaction_id": "tx-1", "updated_at": NOW}),
            )
            expected = 1 if engine.db.dialect.name == "postgresql" else 2
            assert len(statements) == expected, statements
            assert payment.transaction_id == "tx-1" and not s.dirty
    finally:
        event.remove(engine.db, "before_cursor_execute", count)
    with engine.session() as s:
        assert s.scalar(select(RatepayPayment.transaction_id).where(
            RatepayPayment.order_id == order_id)) == "tx-1"
        outcomes = s.scalars(select(RatepayItemOutcome.item_id).where(
            RatepayItemOutcome.order_id == order_id).order_by(RatepayItemOutcome.item_id)).all()
        assert outcomes == sorted(i.id for i in items)
        if written is not None:
            assert sorted(w.item_id for w in written) == outcomes
    with engine.session() as s, s.begin():
        order = s.get_one(Order, order_id)
        items = list(s.scalars(select(OrderItem).where(OrderItem.order_id == order_id)))
        payment = store.get_payment(s, order)
        s.execute(RatepayPayment.__table__.delete().where(RatepayPayment.id == payment.id))
        with pytest.raises(StaleDataError):
            store.record_outcomes(
                s, order, items, "payment_confirm", NOW, success=True,
                payment=(payment, {"updated_at": NOW}),
            )
        assert s.scalar(select(func.count()).select_from(RatepayItemOutcome).where(
            RatepayItemOutcome.action == "payment_confirm")) == 0
