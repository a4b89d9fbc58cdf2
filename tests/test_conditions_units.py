"""The RatePAY conditions' promise about reading the database (``reads_database``)."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast

from ratepay_oms.engine.plugins import CommandContext
from ratepay_oms.persistence.models import Order
from ratepay_oms.persistence.payment import PAYMENT_CONFIRM, PAYMENT_REQUEST
from ratepay_oms.plugins.ratepay.conditions import CONDITIONS
from ratepay_oms.plugins.ratepay.payment_store import prime_outcomes


def _ctx() -> CommandContext:
    return CommandContext(cast(Any, None), cast(Any, None), "e", datetime(2026, 1, 1))


def test_conditions_read_nothing_once_apply_primed_their_outcomes() -> None:
    """After ``apply`` primed the outcomes of an action, its conditions answer from memory
    (no savepoint needed); before that, or for another action or order, they read."""
    order = cast(Order, SimpleNamespace(id=7))
    other = cast(Order, SimpleNamespace(id=8))
    ctx = _ctx()
    success = CONDITIONS["Ratepay/IsPaymentRequestSuccess"]
    declined = CONDITIONS["Ratepay/IsPaymentRequestDeclined"]
    confirmed = CONDITIONS["Ratepay/IsPaymentConfirmed"]
    assert all(c.reads_database(ctx, order) for c in CONDITIONS.values())
    prime_outcomes(ctx.memo, order, PAYMENT_REQUEST, [])
    assert not success.reads_database(ctx, order)
    assert not declined.reads_database(ctx, order)
    assert confirmed.reads_database(ctx, order)
    assert success.reads_database(ctx, other)
    prime_outcomes(ctx.memo, order, PAYMENT_CONFIRM, None)  # written without RETURNING
    assert confirmed.reads_database(ctx, order)
    prime_outcomes(ctx.memo, order, PAYMENT_REQUEST, None)  # forgotten again
    assert success.reads_database(ctx, order)
