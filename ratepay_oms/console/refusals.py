"""Where a gateway refusal shows: the state it left items in, and the reason it gave.

The processes name the states a refusal leads to the way Spryker does: ``… invalid`` (the
gateway refused the call for a technical reason; a manual ``retry …`` event leads out) and
``… declined`` (a risk decision, final). ``order show`` fills an item's ``last_error`` with the
gateway's result and reason for an item left in an ``… invalid`` state (the engine's own
``last_error`` is only for commands that raised), and the matrix marks both kinds of state.
The reason comes from what the command recorded per item (``ratepay_item_outcome``), never
from one order-level code.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from ratepay_oms.persistence.payment import RatepayItemOutcome

INVALID_SUFFIX = " invalid"
DECLINED_SUFFIX = " declined"


def refusal_kind(state: str) -> str | None:
    """``"invalid"``, ``"declined"`` or ``None`` for a state name."""
    if state.endswith(INVALID_SUFFIX):
        return "invalid"
    if state.endswith(DECLINED_SUFFIX):
        return "declined"
    return None


def gateway_reasons(session: Session, item_ids: Iterable[int]) -> dict[int, str]:
    """For each item, the last refusal the gateway gave it, as one line:
    ``PAYMENT_INIT refused: result 150 …; reason 120 Authentification failed``."""
    ids = list(item_ids)
    if not ids:
        return {}
    rows = session.scalars(
        select(RatepayItemOutcome)
        .where(RatepayItemOutcome.item_id.in_(ids), RatepayItemOutcome.success.is_(False))
        .order_by(RatepayItemOutcome.id.desc())
    )
    reasons: dict[int, str] = {}
    for row in rows:
        if row.item_id not in reasons:
            reasons[row.item_id] = describe_outcome(row)
    return reasons


def describe_outcome(row: RatepayItemOutcome) -> str:
    label = f"{row.operation}/{row.subtype}" if row.subtype else row.operation
    codes = []
    if row.result_code:
        codes.append(f"result {row.result_code}")
    if row.reason_code:
        codes.append(f"reason {row.reason_code}")
    text = f"{label} refused"
    if codes:
        text += f" ({', '.join(codes)})"
    if row.message:
        text += f": {row.message}"
    return text
