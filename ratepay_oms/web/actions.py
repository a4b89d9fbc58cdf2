"""The operator log: every event fired and intent resolved in the web console, by whom, and
what came of it (the only writer of ``oms_web_action``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ratepay_oms.persistence.web import WebAction
from ratepay_oms.web.users import utc_now

DONE, REFUSED, FAILED = "done", "refused", "failed"
EVENT, RESOLVE = "event", "resolve intent"


@dataclass(frozen=True)
class Action:
    user_name: str
    action: str
    event: str | None
    item_ids: list[int]
    detail: dict[str, Any]
    outcome: str
    message: str | None
    created_at: datetime


def record(
    sessions: sessionmaker[Session] | Any,
    *,
    user_name: str,
    order_id: int,
    action: str,
    outcome: str,
    event: str | None = None,
    item_ids: Sequence[int] = (),
    detail: Mapping[str, Any] | None = None,
    message: str | None = None,
) -> None:
    with sessions() as session, session.begin():
        session.add(
            WebAction(
                user_name=user_name, order_id=order_id, action=action, event=event,
                item_ids=json.dumps(list(item_ids)),
                detail=json.dumps(dict(detail or {}), sort_keys=True, default=str),
                outcome=outcome, message=message, created_at=utc_now(),
            )
        )


def for_order(session: Session, order_id: int, limit: int = 200) -> list[Action]:
    """The newest ``limit`` actions on one order, oldest first."""
    rows = list(
        session.scalars(
            select(WebAction)
            .where(WebAction.order_id == order_id)
            .order_by(WebAction.id.desc())
            .limit(limit)
        )
    )
    return [
        Action(
            r.user_name, r.action, r.event, json.loads(r.item_ids or "[]"),
            json.loads(r.detail or "{}"), r.outcome, r.message, r.created_at,
        )
        for r in reversed(rows)
    ]
