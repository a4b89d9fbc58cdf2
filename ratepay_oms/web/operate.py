"""What operators do: fire a manual event on chosen items, resolve an open intent. Each is
recorded in the operator log with the user's name and its outcome, and its answer is shown on
the next page (a flash), so a double click's refusal is on screen."""

from __future__ import annotations

import functools
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ratepay_oms.console.apilog import mask_text
from ratepay_oms.engine.errors import ManualEventError, OrderLockedError
from ratepay_oms.errors import OmsError
from ratepay_oms.web import actions
from ratepay_oms.web.base import BUSY, Console, url
from ratepay_oms.web.pages import parse_int
from ratepay_oms.web.queries import order_id_of
from ratepay_oms.web.users import LoginSession

log = logging.getLogger(__name__)


def _chosen_items(console: Console, ref: str, event: str, form: FormData) -> list[int] | None:
    """Item ids from the form: ticked items, plus "take N" of SKU/state groups (big orders);
    ``None`` when "every item that accepts it" was ticked."""
    if form.get("all") == "1":
        return None
    chosen = [int(v) for v in form.getlist("item_id") if str(v).isdigit()]
    takes = [
        (str(g), parse_int(str(n)) or 0)
        for g, n in zip(form.getlist("group"), form.getlist("take"), strict=False)
    ]
    if any(n > 0 for _, n in takes):
        view = console.engine.order(ref)
        definition = console.engine.definitions().get(view.process)
        free: dict[str, list[int]] = {}
        for item in view.items:
            accepts = definition is not None and event in definition.events_from(item.state)
            if item.intent_id is None and accepts and item.id not in chosen:
                free.setdefault(f"{item.sku}\x1f{item.state}", []).append(item.id)
        for key, n in takes:
            chosen.extend(free.get(key, [])[: max(n, 0)])
    return chosen


async def fire_event(console: Console, request: Request, login: LoginSession) -> Response:
    ref = request.path_params["ref"]
    form = await request.form()
    event = str(form.get("event") or "")
    back = RedirectResponse(url(request, "order", ref=ref), 303)
    order_id = await run_in_threadpool(_order_id, console, ref)
    if order_id is None:
        return console.refuse(request, 404, f"No order {ref!r}.", login)
    data: dict[str, Any] = {}
    for key, _label in console.event_data.get(event, ()):
        value = str(form.get(f"data.{key}") or "").strip()
        if value:
            data[key] = value.replace(",", " ").split() if key.endswith("_ids") else value

    def fire() -> tuple[str, str, list[int] | None]:
        with console.working_on(ref) as free:
            if not free:
                return actions.REFUSED, BUSY.format(ref=ref), None
            return fire_now()

    def fire_now() -> tuple[str, str, list[int] | None]:
        item_ids = _chosen_items(console, ref, event, form)
        if item_ids == []:
            return actions.REFUSED, "choose at least one item (or tick every item)", item_ids
        kwargs: dict[str, Any] = {"data": data} if console.takes_data and data else {}
        try:
            result = console.acting_engine(login).trigger(event, ref, item_ids, **kwargs)
        except (ManualEventError, OrderLockedError) as exc:
            return actions.REFUSED, str(exc), item_ids
        except OmsError as exc:
            return actions.FAILED, str(exc), item_ids
        moved = len({item for item, _s, _t in result.moved})
        parts = [f"{moved} item{'s' if moved != 1 else ''} moved"]
        firsts: dict[int, tuple[str, str]] = {}
        for item, source, target in result.moved:
            firsts[item] = (firsts.get(item, (source, target))[0], target)
        if firsts:
            parts.append(", ".join(f"item {i}: {s} → {t}" for i, (s, t) in firsts.items()))
        if result.stayed:
            parts.append(f"stayed: {', '.join(map(str, result.stayed))}")
        if result.errors:
            parts.append("errors: " + "; ".join(mask_text(e) or "" for e in result.errors))
            return actions.FAILED, "; ".join(parts), item_ids
        return actions.DONE, "; ".join(parts), item_ids

    try:
        outcome, message, item_ids = await run_in_threadpool(fire)
    except Exception:
        log.exception("event %r on %s failed", event, ref)
        outcome, message, item_ids = actions.FAILED, "internal error (see the server log)", None
    await run_in_threadpool(
        functools.partial(
            actions.record, console.engine.session, user_name=login.user.name,
            order_id=order_id, action=actions.EVENT, event=event, item_ids=item_ids or [],
            detail=data, outcome=outcome, message=message,
        )
    )
    kind = {"done": "ok", "refused": "refused", "failed": "error"}[outcome]
    label = {"done": "done", "refused": "REFUSED", "failed": "FAILED"}[outcome]
    await run_in_threadpool(
        console.users.push_flash, login.id, kind, f"'{event}' {label}: {message}"
    )
    return back


def _order_id(console: Console, ref: str) -> int | None:
    with console.engine.session() as session:
        return order_id_of(session, ref)


async def resolve_intent(console: Console, request: Request, login: LoginSession) -> Response:
    ref = request.path_params["ref"]
    intent_id = int(request.path_params["intent_id"])
    form = await request.form()
    decision = str(form.get("decision") or "")
    note = str(form.get("note") or "").strip()
    order_id = await run_in_threadpool(_order_id, console, ref)
    if order_id is None:
        return console.refuse(request, 404, f"No order {ref!r}.", login)

    def resolve() -> tuple[str, str]:
        with console.working_on(ref) as free:
            return resolve_now() if free else (actions.REFUSED, BUSY.format(ref=ref))

    def resolve_now() -> tuple[str, str]:
        if decision not in ("booked", "not booked"):
            return actions.REFUSED, "choose booked or not booked"
        if not note:
            return actions.REFUSED, "say in a note what you checked at RatePAY"
        owned = [i.id for i in console.engine.intents(ref, open_only=False)]
        if intent_id not in owned:
            return actions.REFUSED, f"intent {intent_id} is not an intent of order {ref}"
        try:
            result = console.acting_engine(login).resolve_intent(
                intent_id, booked=decision == "booked",
                note=f"{note} ({login.user.name}, web console)",
            )
        except OmsError as exc:
            return actions.REFUSED, str(exc)
        moved = len({item for item, _s, _t in result.moved})
        text = f"intent {intent_id} resolved as {decision}; {moved} items moved"
        if result.errors:
            return actions.FAILED, text + "; errors: " + "; ".join(
                mask_text(e) or "" for e in result.errors
            )
        return actions.DONE, text

    outcome, message = await run_in_threadpool(resolve)
    await run_in_threadpool(
        functools.partial(
            actions.record, console.engine.session, user_name=login.user.name,
            order_id=order_id, action=actions.RESOLVE, detail={"intent": intent_id,
            "decision": decision, "note": note}, outcome=outcome, message=message,
        )
    )
    kind = {"done": "ok", "refused": "refused", "failed": "error"}[outcome]
    await run_in_threadpool(
        console.users.push_flash, login.id, kind, f"resolve intent {intent_id}: {message}"
    )
    return RedirectResponse(url(request, "order", ref=ref), 303)
