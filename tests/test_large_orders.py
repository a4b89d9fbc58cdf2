"""Large orders: an order of hundreds of units (one item row per unit) placed, shown and
shipped, on every dialect.

A 300-unit order over three SKUs stands in for the 10,000-unit orders ``bench/large_order.py``
times (speed is the bench's job; these check what the set-based paths write): every unit's
state, history and outcome rows, the RatePAY baskets with one position per SKU carrying the
quantity, the machine's choice per item when one group's items get different condition
answers, and the console's summary of a big order (``order show`` / ``--items`` / ``--json``,
``order place``, ``event``).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ratepay_oms.cli import _mount, cli
from ratepay_oms.demo import demo_engine, example_order, sent_basket
from ratepay_oms.engine.engine import Engine
from ratepay_oms.engine.plugins import PluginRegistry
from ratepay_oms.persistence.conditions import ConditionResult
from ratepay_oms.persistence.payment import RatepayItemOutcome
from ratepay_oms.process.loader import load_processes

LINES = (  # sku, units, unit price, per-unit discount
    ("SKU-100", 150, "0.30", None),
    ("SKU-200", 120, "0.40", "-0.05"),
    ("SKU-300", 30, "1.33", None),
)
UNITS = sum(units for _, units, _, _ in LINES)
AUTHORISED = [
    "new", "payment request initialized", "payment confirmation initialized",
    "payment confirmed", "ready for shipment",
]


def big_order(ref: str) -> dict[str, Any]:
    doc = example_order(ref)
    doc["items"] = [
        {"sku": sku, "name": f"Article {sku}", "quantity": units, "unit_price_gross": price,
         "tax_rate": "19", **({"discount": discount} if discount else {})}
        for sku, units, price, discount in LINES
    ]
    return doc


def expected_positions() -> list[tuple[str, int, D, D]]:
    return [(sku, units, D(price), D(discount or "0")) for sku, units, price, discount in LINES]


@pytest.fixture
def engine(server_db_url, sandbox):
    eng = demo_engine(server_db_url, sandbox.settings)
    yield eng
    eng.close()


def _baskets(sandbox, operation: str) -> list[dict[str, Any] | None]:
    return [sent_basket(ex.request_xml) for ex in sandbox.gateway.received
            if ex.operation == operation]


def _outcomes(engine: Engine, ref: str) -> Counter[tuple[str, bool]]:
    with engine.session() as session:
        order_id = session.scalar(sa.text("SELECT id FROM oms_order WHERE order_ref = :r"),
                                  {"r": ref})
        rows = session.execute(
            sa.select(RatepayItemOutcome.action, RatepayItemOutcome.success)
            .where(RatepayItemOutcome.order_id == order_id)
        ).all()
    return Counter((action, bool(success)) for action, success in rows)


def test_a_300_unit_order_is_authorised_with_one_basket_position_per_sku(engine, sandbox):
    ref = f"L-{uuid.uuid4().hex[:8]}"
    view = engine.place_order(big_order(ref))

    assert len(view.items) == UNITS
    assert Counter(i.sku for i in view.items) == {sku: n for sku, n, _, _ in LINES}
    assert {i.state for i in view.items} == {"ready for shipment"}
    (request,) = _baskets(sandbox, "PAYMENT_REQUEST")
    assert request is not None and request["items"] == expected_positions()
    assert request["amount"] == D("45.00") + D("42.00") + D("39.90") + D("4.95") - D("5.00")
    # Every unit has its own history, the same path, in order; and one outcome per call.
    paths: dict[int, list[str]] = {}
    for entry in engine.history(ref):
        paths.setdefault(entry.item_id, []).append(entry.to_state)
    assert set(paths) == {i.id for i in view.items}
    assert all(path == AUTHORISED for path in paths.values())
    assert _outcomes(engine, ref) == {("payment_request", True): UNITS,
                                      ("payment_confirm", True): UNITS}


def test_shipping_every_unit_confirms_one_delivery_with_the_quantities_per_sku(engine, sandbox):
    ref = f"L-{uuid.uuid4().hex[:8]}"
    engine.place_order(big_order(ref))

    result = engine.trigger("ship", ref)

    assert not result.errors
    assert {i.state for i in engine.order(ref).items} == {"ready for refund"}
    (delivery,) = _baskets(sandbox, "CONFIRMATION_DELIVER")
    assert delivery is not None and delivery["items"] == expected_positions()
    tid = next(iter(sandbox.gateway.transactions))
    ledger = sandbox.gateway.ledger(tid)
    assert {sku: (p.delivered, p.open) for sku, p in ledger.items()
            if sku.startswith("SKU-")} == {sku: (n, 0) for sku, n, _, _ in LINES}
    assert _outcomes(engine, ref)[("delivery", True)] == UNITS
    moved = Counter((source, target) for _, source, target in result.moved)
    assert sum(moved.values()) == len(result.moved)
    assert all(count == UNITS for count in moved.values())


def test_each_units_condition_detail_names_its_own_outcome_as_json_encodes_it(engine):
    """The conditions encode a group's detail once and splice each outcome's id in: the
    stored text must be what encoding each unit's own read gives."""
    from ratepay_oms.plugins.ratepay.conditions import _read

    ref = f"L-{uuid.uuid4().hex[:8]}"
    view = engine.place_order(big_order(ref))
    ids = {i.id for i in view.items}
    with engine.session() as session:
        results = session.execute(
            sa.select(ConditionResult.item_id, ConditionResult.condition, ConditionResult.detail)
            .where(ConditionResult.item_id.in_(ids))
        ).all()
        newest: dict[tuple[int, str], RatepayItemOutcome] = {}
        for outcome in session.scalars(
            sa.select(RatepayItemOutcome).where(RatepayItemOutcome.item_id.in_(ids))
            .order_by(RatepayItemOutcome.id)
        ):
            newest[(outcome.item_id, outcome.action)] = outcome
        expected = {}
        for item_id, name, detail in results:
            action = json.loads(detail)["action"]
            expected[(item_id, name)] = json.dumps(
                _read(action, newest[(item_id, action)]), default=str, sort_keys=True
            )
    by_condition = Counter(name for _, name, _ in results)
    assert by_condition == {"Ratepay/IsPaymentRequestSuccess": UNITS,
                            "Ratepay/IsPaymentConfirmed": UNITS}
    assert {(i, n): d for i, n, d in results} == expected
    assert len({d for _, _, d in results}) == 2 * UNITS  # each names its own outcome


# -- one group, different condition answers ---------------------------------------------------

SPLIT_PROCESS = """\
process: TestSplit01
initial: new
states: {new: {}, even: {}, odd: {}}
transitions:
  - {source: new, target: even, event: split, condition: Test/IsEven}
  - {source: new, target: odd, event: split}
events:
  split: {manual: true}
"""


def test_items_of_one_group_with_different_condition_answers_each_take_their_own_way(
    server_db_url, tmp_path: Path
):
    (tmp_path / "TestSplit01.yaml").write_text(SPLIT_PROCESS, encoding="utf-8")
    registry = PluginRegistry()
    registry.register_condition("Test/IsEven", lambda ctx, order, item: item.id % 2 == 0)
    definitions = load_processes(tmp_path, registry)
    engine = Engine(server_db_url, registry=registry, definitions=definitions)
    try:
        engine.upgrade_db()
        ref = f"L-{uuid.uuid4().hex[:8]}"
        order = example_order(ref)
        order["process"] = "TestSplit01"
        order["items"] = [{"sku": "SKU-1", "name": "x", "quantity": 7,
                           "unit_price_gross": "1.00", "tax_rate": "19"}]
        engine.place_order(order)
        engine.trigger("split", ref)
        items = engine.order(ref).items
        assert [i.state for i in items] == ["even" if i.id % 2 == 0 else "odd" for i in items]
        with engine.session() as session:
            answers = dict(session.execute(
                sa.select(ConditionResult.item_id, ConditionResult.result)
                .where(ConditionResult.item_id.in_([i.id for i in items]))
            ).all())
        assert {k: bool(v) for k, v in answers.items()} == {i.id: i.id % 2 == 0 for i in items}
    finally:
        engine.close()


# -- the console -------------------------------------------------------------------------------


def _run(env: dict[str, str], *args: str) -> tuple[int, str]:
    _mount()
    result = CliRunner().invoke(cli, list(args), env=env)
    return result.exit_code, result.output


@pytest.fixture
def cli_env(server_db_url, sandbox) -> dict[str, str]:
    env = {"RATEPAY_OMS_DATABASE_URL": server_db_url, "COLUMNS": "200"}
    return env | {f"RATEPAY_{k}": v for k, v in sandbox.settings.items()}


def test_order_place_and_show_summarise_a_big_order_by_sku_and_state(
    engine, cli_env, tmp_path: Path
):
    ref = f"L-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "big.json"
    path.write_text(json.dumps(big_order(ref)), encoding="utf-8")

    code, placed = _run(cli_env, "order", "place", str(path))
    assert code == 0, placed
    assert f"placed order {ref} (RatepayInvoice01): {UNITS} items" in placed
    assert f"{UNITS} items by SKU and state" in placed
    assert len(placed.splitlines()) < 30

    code, shown = _run(cli_env, "order", "show", ref)
    assert code == 0, shown
    assert f"{UNITS} items by SKU and state (--items: every item)" in shown
    rows = [line for line in shown.splitlines() if "ready for shipment" in line]
    assert [(r.split("│")[1].strip(), r.split("│")[4].strip(), r.split("│")[5].strip())
            for r in rows] == [("SKU-100", "150", "45.00"), ("SKU-200", "120", "42.00"),
                               ("SKU-300", "30", "39.90")]
    assert len(shown.splitlines()) < 40


def test_order_show_items_lists_every_unit_and_json_keeps_the_shape(engine, cli_env):
    ref = f"L-{uuid.uuid4().hex[:8]}"
    view = engine.place_order(big_order(ref))
    small = f"L-{uuid.uuid4().hex[:8]}"
    engine.place_order(example_order(small))

    code, listed = _run(cli_env, "order", "show", ref, "--items")
    assert code == 0, listed
    ids = [int(line.split()[0]) for line in listed.splitlines() if line.split()[:1]
           and line.split()[0].isdigit() and "ready for shipment" in line]
    assert ids == [i.id for i in view.items]

    code, out = _run(cli_env, "order", "show", ref, "--json")
    assert code == 0
    big = json.loads(out)
    code, out = _run(cli_env, "order", "show", small, "--json")
    reference = json.loads(out)
    assert set(big) == set(reference)
    assert len(big["items"]) == UNITS
    assert all(set(item) == set(reference["items"][0]) for item in big["items"])
    assert big["states"] == {"ready for shipment": UNITS}
    assert big["amounts"]["ordered"] == "126.90"

    code, summary = _run(cli_env, "order", "show", small, "--summary")
    assert code == 0 and "4 items by SKU and state" in summary
    code, _ = _run(cli_env, "order", "show", small, "--summary", "--items")
    assert code == 2


def test_event_on_a_big_order_prints_one_line_per_move_not_per_unit(engine, cli_env):
    ref = f"L-{uuid.uuid4().hex[:8]}"
    engine.place_order(big_order(ref))

    code, out = _run(cli_env, "event", "ship", ref)

    assert code == 0, out
    moves = [line for line in out.splitlines() if line.startswith(f"{UNITS} items: ")]
    assert moves and "ready for shipment →" in moves[0]
    assert not any(line.startswith("item ") for line in out.splitlines())


# -- the large path writes what the small path writes ----------------------------------------


def _item_rows(engine: Engine, ref: str) -> tuple[list[Any], list[Any]]:
    """Every durable row of the order per item (history, transition log, condition answers,
    outcomes, timeouts, the item's own columns), with ids and moments left out, and the
    order's intents."""
    from ratepay_oms.persistence.models import (
        EventTimeout,
        Intent,
        OrderItem,
        StateHistory,
        TransitionLog,
    )

    def plain(detail: str | None) -> Any:
        read = json.loads(detail) if detail else None
        if read and read.get("outcome"):
            read["outcome"] = {k: v for k, v in read["outcome"].items()
                               if k not in ("id", "created_at")}
        return read

    with engine.session() as session:
        order_id = session.scalar(sa.text("SELECT id FROM oms_order WHERE order_ref = :r"),
                                  {"r": ref})
        items = session.scalars(
            sa.select(OrderItem).where(OrderItem.order_id == order_id).order_by(OrderItem.id)
        ).all()
        rows: dict[int, dict[str, list[Any]]] = {
            i.id: {"item": [(i.state, i.intent_id, i.retry_at, i.attempts, i.last_error)]}
            for i in items
        }
        queries = {
            "history": (StateHistory, lambda h: (h.from_state, h.to_state, h.event,
                                                 bool(h.forced), h.data)),
            "log": (TransitionLog, lambda t: (t.process, t.event, t.source_state,
                                              t.target_state, t.command, t.condition,
                                              bool(t.is_error), t.error_message)),
            "conditions": (ConditionResult, lambda c: (c.condition, c.process, c.state,
                                                       c.event, bool(c.result),
                                                       plain(c.detail))),
            "outcomes": (RatepayItemOutcome, lambda o: (o.action, bool(o.success),
                                                        o.operation, o.subtype,
                                                        o.result_code, o.reason_code,
                                                        o.message)),
        }
        for name, (model, shape) in queries.items():
            for row in session.scalars(
                sa.select(model).where(model.order_id == order_id).order_by(model.id)
            ):
                rows[row.item_id].setdefault(name, []).append(shape(row))
        for timeout in session.scalars(
            sa.select(EventTimeout).where(EventTimeout.item_id.in_(list(rows)))
            .order_by(EventTimeout.id)
        ):
            rows[timeout.item_id].setdefault("timeouts", []).append(
                (timeout.state, timeout.event))
        intents = [
            (i.command, i.state, i.event, i.status, i.resolution, len(json.loads(i.item_ids)))
            for i in session.scalars(
                sa.select(Intent).where(Intent.order_id == order_id).order_by(Intent.id))
        ]
    return [rows[i.id] for i in items], intents


def test_a_big_order_writes_per_unit_exactly_what_a_small_one_writes(engine):
    """Placing and shipping 300 units (outcomes and conditions set-based, the group chosen
    at once) leaves every unit with the same rows, in the same order, as each unit of a
    3-unit order (outcomes one by one), and one intent per call either way."""
    small, big = f"S-{uuid.uuid4().hex[:8]}", f"L-{uuid.uuid4().hex[:8]}"
    doc = big_order(small)
    doc["items"] = [dict(line, quantity=1) for line in doc["items"]]
    engine.place_order(doc)
    engine.place_order(big_order(big))
    for ref in (small, big):
        engine.trigger("ship", ref)
    small_rows, small_intents = _item_rows(engine, small)
    big_rows, big_intents = _item_rows(engine, big)
    assert len(small_rows) == 3 and len(big_rows) == UNITS
    expected = small_rows[0]
    assert all(rows == expected for rows in small_rows)
    assert set(expected) == {"item", "history", "log", "conditions", "outcomes", "timeouts"}
    assert len(expected["conditions"]) == 3  # request, confirmation, delivery answers
    assert all(answer[4] and answer[5]["outcome"] for answer in expected["conditions"])
    for rows in big_rows:
        assert rows == expected
    assert [i[:5] for i in big_intents] == [i[:5] for i in small_intents]
    assert [i[5] for i in big_intents] == [UNITS] * len(big_intents)
    assert [i[5] for i in small_intents] == [3] * len(small_intents)


def test_the_collector_pauses_only_for_big_work_and_comes_back():
    import gc

    from ratepay_oms.engine.collector import CollectorPause

    assert gc.isenabled()
    with CollectorPause(threshold=10) as pause:
        pause.engage(9)
        assert gc.isenabled()  # small work: untouched
        pause.engage(10)
        assert not gc.isenabled()
        with CollectorPause(threshold=10) as inner:  # another drive at the same time
            inner.engage(50)
        assert not gc.isenabled()  # still the outer one's
    assert gc.isenabled()
    gc.disable()  # a host that switched it off keeps it off
    try:
        with CollectorPause(threshold=1) as pause:
            pause.engage(5)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), CollectorPause(threshold=1) as pause:
        pause.engage(5)
        raise RuntimeError("a drive that fails")
    assert gc.isenabled()
