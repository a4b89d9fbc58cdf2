"""The operator console against real databases, with orders moved through the engine.

Every order here is placed with ``Engine.place_order`` and moved with ``trigger`` / ``tick``
on a small process of our own (``tests/processes/console``); nothing writes item rows by hand.
The process files are copied with a per-run name so the shared session database of each
dialect can hold other tests' orders without disturbing the counts checked here.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydot
import pytest
import sqlalchemy as sa

from ratepay_oms.cli import main
from ratepay_oms.engine.engine import Engine
from ratepay_oms.engine.plugins import ByItemCommand, PluginRegistry
from ratepay_oms.persistence.api_log import ApiLogEntry
from ratepay_oms.persistence.models import EventTimeout, Order, OrderItem, StateHistory

HERE = Path(__file__).parent
PROCESS_SOURCES = HERE / "processes" / "console"
EXAMPLE = json.loads((HERE / "data" / "order-invoice.json").read_text(encoding="utf-8"))
NOW = datetime(2024, 8, 1, 12, 0, 0)
SECRET = "4c0ffee4c0ffee4c0ffee4c0ffee4c0f"


class AlwaysFails(ByItemCommand):
    """A command whose gateway is down: leaves the items in place with a retry scheduled."""

    def run_item(self, ctx: Any, order: Any, item: Any) -> None:
        raise RuntimeError("gateway unreachable")


def register_plugins(reg: PluginRegistry) -> None:
    """For ``$RATEPAY_OMS_PLUGINS`` when a CLI command builds its own engine."""
    reg.register_by_item("Console/AlwaysFails", AlwaysFails())


def registry() -> PluginRegistry:
    reg = PluginRegistry()
    register_plugins(reg)
    return reg


@dataclass
class World:
    url: str
    process_dir: Path
    p1: str
    p2: str
    engine: Engine
    refs: dict[str, str]

    def items(self, process: str | None = None) -> dict[tuple[str, str], int]:
        """Direct count of item states, the truth the matrix must match."""
        eng = sa.create_engine(self.url)
        try:
            with eng.connect() as conn:
                stmt = sa.select(OrderItem.process, OrderItem.state, sa.func.count()).group_by(
                    OrderItem.process, OrderItem.state
                )
                stmt = stmt.where(OrderItem.process.in_([process] if process else [self.p1]))
                return {(p, s): n for p, s, n in conn.execute(stmt)}
        finally:
            eng.dispose()


def copy_processes(target: Path, token: str) -> tuple[str, str]:
    target.mkdir(parents=True, exist_ok=True)
    for src in PROCESS_SOURCES.glob("*.yaml"):
        text = src.read_text(encoding="utf-8").replace("ConsoleTest", f"Console{token}T")
        (target / src.name.replace("ConsoleTest", f"Console{token}T")).write_text(text)
    return f"Console{token}T01", f"Console{token}T02"


def order_data(ref: str, process: str, quantities: tuple[int, ...]) -> dict[str, Any]:
    data = json.loads(json.dumps(EXAMPLE))
    data["order_ref"] = ref
    data["process"] = process
    data["items"] = [
        {"sku": f"SKU-{n}", "name": f"Thing {n}", "quantity": q, "unit_price_gross": "10.00",
         "tax_rate": "19"}
        for n, q in enumerate(quantities, start=1)
    ]
    return data


def populate(engine: Engine, process: str, token: str) -> dict[str, str]:
    """Orders spread over states and ages, only through the engine's public API."""
    refs = {name: f"C{token}-{name}" for name in "ABCDEF"}
    ago = lambda days: NOW - timedelta(days=days)  # noqa: E731

    def place(name: str, qty: tuple[int, ...], when: datetime, tick: bool = True) -> None:
        engine.place_order(order_data(refs[name], process, qty), now=when)
        if tick:
            engine.tick(now=when)

    place("A", (2, 1), ago(20))                     # 3 items → delivered (20 days ago)
    engine.trigger("ship", refs["A"], now=ago(20))
    engine.trigger("deliver", refs["A"], now=ago(20))
    place("B", (2,), ago(3))                        # 1 shipped (3 days), 1 authorized
    item_b = engine.order(refs["B"]).items[0].id
    engine.trigger("ship", refs["B"], [item_b], now=ago(3))
    place("D", (1,), ago(40))                       # cancelled long ago
    engine.trigger("cancel", refs["D"], now=ago(40))
    place("E", (2,), ago(2))                        # invoice fails: errors + retries
    engine.trigger("invoice", refs["E"], now=ago(2))
    place("F", (1,), ago(45))                       # delivered 45 days ago, closed by timeout
    engine.trigger("ship", refs["F"], now=ago(45))
    engine.trigger("deliver", refs["F"], now=ago(45))
    engine.tick(now=ago(5))
    place("C", (1, 1), NOW - timedelta(hours=1), tick=False)  # 2 new, today (no tick since)
    return refs


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("RATEPAY_OMS_DATABASE_URL", raising=False)
    monkeypatch.delenv("RATEPAY_OMS_PLUGINS", raising=False)


@pytest.fixture(scope="module")
def world(server_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> World:
    token = secrets.token_hex(3)
    process_dir = tmp_path_factory.mktemp("console-processes")
    p1, p2 = copy_processes(process_dir, token)
    engine = Engine(server_db_url, process_dir=process_dir, registry=registry())
    engine.upgrade_db()
    refs = populate(engine, p1, token)
    yield World(server_db_url, process_dir, p1, p2, engine, refs)
    engine.close()


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- matrix -----------------------------------------------------------------------------------
def test_matrix_counts_equal_the_item_states(world: World, capsys: pytest.CaptureFixture[str]):
    code, out, err = run(capsys, "matrix", "--db", world.url, "--processes", world.process_dir,
                         "--process", world.p1, "--now", NOW.isoformat(), "--json")
    assert code == 0, err
    data = json.loads(out)
    [row] = data["processes"]
    counted = {(row["process"], c["state"]): c["total"] for c in row["states"] if c["total"]}
    assert counted == world.items()
    assert counted == {
        (world.p1, "new"): 2, (world.p1, "authorized"): 3, (world.p1, "shipped"): 1,
        (world.p1, "delivered"): 3, (world.p1, "closed"): 1, (world.p1, "cancelled"): 1,
    }
    assert row["total"] == 11


def test_matrix_splits_by_age_and_flags_errors(world: World, capsys: pytest.CaptureFixture[str]):
    code, out, _ = run(capsys, "matrix", "--db", world.url, "--processes", world.process_dir,
                       "--process", world.p1, "--now", NOW.isoformat(), "--json")
    assert code == 0
    states = {c["state"]: c for c in json.loads(out)["processes"][0]["states"]}
    assert (states["new"]["today"], states["new"]["week"], states["new"]["older"]) == (2, 0, 0)
    # authorized: 1 of order B (3 days), 2 of order E (2 days, failed invoice)
    assert (states["authorized"]["week"], states["authorized"]["errors"]) == (3, 2)
    assert states["authorized"]["retries"] == 2
    assert (states["delivered"]["older"], states["cancelled"]["older"]) == (3, 1)
    assert states["closed"]["week"] == 1 and states["closed"]["final"] is True
    assert states["shipped"]["errors"] == 0 and states["shipped"]["retries"] == 0


def test_matrix_table_marks_states_that_need_a_person(
    world: World, capsys: pytest.CaptureFixture[str]
):
    code, out, _ = run(capsys, "matrix", "--db", world.url, "--processes", world.process_dir,
                       "--process", world.p1, "--now", NOW.isoformat())
    assert code == 0
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert "!" in lines["authorized"].split("│")[-2]
    assert "!" not in lines["shipped"].split("│")[-2]


# -- order show -------------------------------------------------------------------------------
def test_order_detail_lists_items_retries_timeouts_and_gateway_calls(world: World):
    from ratepay_oms.console.inspect import order_detail

    with world.engine.session() as session, session.begin():
        order_id = session.scalar(sa.select(Order.id).where(Order.order_ref == world.refs["E"]))
        session.add(ApiLogEntry(
            created_at=NOW, operation="PAYMENT_REQUEST", order_ref=world.refs["E"],
            transaction_id="TX-E", success=False, result_code="401", result_text="declined",
            request_xml=f"<securitycode>{SECRET}</securitycode>", response_xml="<r/>",
        ))
    assert order_id is not None
    detail = order_detail(world.engine, world.refs["E"], now=NOW)
    assert [i["state"] for i in detail["items"]] == ["authorized", "authorized"]
    assert {r["event"] for r in detail["retries"]} == {"invoice"}
    assert all(r["attempts"] == 1 and r["due"] for r in detail["retries"])
    assert detail["payment"] == {"method": "INVOICE", "transaction_id": "TX-E",
                                 "short_id": None, "descriptor": None}
    assert detail["gateway_calls"][0]["result_code"] == "401"
    assert SECRET not in json.dumps(detail)
    assert detail["amounts"]["ordered"] == "20.00"

    delivered = order_detail(world.engine, world.refs["A"], now=NOW)
    assert {t["event"] for t in delivered["timeouts"]} == {"close"}
    assert len(delivered["timeouts"]) == 3
    assert delivered["timeouts"][0]["due_at"] == (NOW + timedelta(days=10)).isoformat()


def test_order_show_keeps_the_engine_keys_and_adds_the_detail(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("RATEPAY_OMS_PLUGINS", f"{__name__}:register_plugins")
    ref = world.refs["B"]
    code, out, err = run(capsys, "order", "show", ref, "--db", world.url, "--processes",
                         world.process_dir, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["order_ref"] == ref and data["process"] == world.p1
    assert sorted(i["state"] for i in data["items"]) == ["authorized", "shipped"]
    assert all({"id", "sku", "state", "amount", "manual_events"} <= set(i) for i in data["items"])
    assert data["amounts"]["ordered"] == "20.00"
    assert data["payment"]["method"] == "INVOICE"
    assert {i["state"]: i["manual_events"] for i in data["items"]}["authorized"] == [
        "ship", "cancel", "invoice"]
    code, out, _ = run(capsys, "order", "show", world.refs["E"], "--db", world.url,
                       "--processes", world.process_dir)
    assert code == 0
    assert "amounts: ordered 20.00 EUR" in out and "retry" in out and "gateway unreachable" in out


# -- process draw --order ---------------------------------------------------------------------
def test_draw_dot_parses_and_has_every_state_and_transition(
    world: World, capsys: pytest.CaptureFixture[str]
):
    code, out, err = run(capsys, "process", "draw", world.p1, "--dir", world.process_dir)
    assert code == 0, err
    [graph] = pydot.graph_from_dot_data(out)
    nodes = {n.get_name().strip('"') for n in graph.get_nodes()} - {"node", "edge", "graph"}
    definition = world.engine.definitions()[world.p1]
    assert nodes == set(definition.states)
    edges = Counter((e.get_source().strip('"'), e.get_destination().strip('"'))
                    for e in graph.get_edges())
    assert edges == Counter((t.source, t.target) for t in definition.transitions)


def test_draw_order_highlights_its_states_with_counts(
    world: World, capsys: pytest.CaptureFixture[str]
):
    code, out, err = run(capsys, "process", "draw", world.p1, "--dir", world.process_dir,
                         "--order", world.refs["B"], "--db", world.url)
    assert code == 0, err
    [graph] = pydot.graph_from_dot_data(out)
    filled = {}
    for node in graph.get_nodes():
        if "filled" in (node.get("style") or ""):
            filled[node.get_name().strip('"')] = node.get("label")
    assert set(filled) == {"authorized", "shipped"}
    assert all("1 item" in label for label in filled.values())


# -- log --------------------------------------------------------------------------------------
def test_log_errors_shows_only_failed_calls_and_never_the_security_code(
    world: World, capsys: pytest.CaptureFixture[str]
):
    ref = world.refs["C"]
    with world.engine.session() as session, session.begin():
        session.add_all([
            ApiLogEntry(created_at=NOW, operation="PAYMENT_REQUEST", order_ref=ref, success=True,
                        result_code="402", request_xml=f"<securitycode>{SECRET}</securitycode>"),
            ApiLogEntry(created_at=NOW, operation="CONFIRMATION_DELIVER", order_ref=ref,
                        success=False, result_code="405",
                        request_xml=f'<head><credential><securitycode>{SECRET}</securitycode>'),
            ApiLogEntry(created_at=NOW, operation="PAYMENT_CHANGE", subtype="cancellation",
                        order_ref=ref, success=None, error=f"timeout; security_code={SECRET}",
                        request_xml="<x/>"),
        ])
    code, out, _ = run(capsys, "log", "--db", world.url, "--order", ref, "--errors", "--xml",
                       "--json")
    assert code == 0
    calls = json.loads(out)
    assert [c["operation"] for c in calls] == ["PAYMENT_CHANGE", "CONFIRMATION_DELIVER"]
    assert all(c["failed"] for c in calls)
    assert SECRET not in out
    assert "********" in out
    code, out, _ = run(capsys, "log", "--db", world.url, "--order", ref, "--xml")
    assert code == 0 and SECRET not in out and "PAYMENT_REQUEST" in out
    code, out, _ = run(capsys, "log", "--db", world.url, "--order", ref,
                       "--operation", "payment_change/CANCELLATION", "--json")
    assert [c["subtype"] for c in json.loads(out)] == ["cancellation"]


# -- locks ------------------------------------------------------------------------------------
def test_locks_clear_removes_only_expired_leases(world: World, capsys: pytest.CaptureFixture[str]):
    expired, live = world.refs["A"], world.refs["B"]
    with world.engine.session() as session, session.begin():
        session.execute(sa.update(Order).where(Order.order_ref == expired).values(
            claimed_by="dead-worker", claim_expires_at=NOW - timedelta(minutes=5)))
        session.execute(sa.update(Order).where(Order.order_ref == live).values(
            claimed_by="live-worker", claim_expires_at=NOW + timedelta(minutes=5)))
    code, out, _ = run(capsys, "locks", "list", "--db", world.url, "--now", NOW.isoformat(),
                       "--json")
    mine = {x["order_ref"]: x for x in json.loads(out) if x["order_ref"] in (expired, live)}
    assert mine[expired]["expired"] is True and mine[live]["expired"] is False
    code, out, _ = run(capsys, "locks", "clear", "--db", world.url, "--now", NOW.isoformat(),
                       "--json")
    assert code == 0
    cleared = json.loads(out)["cleared"]
    assert expired in cleared and live not in cleared
    with world.engine.session() as session:
        held = dict(session.execute(sa.select(Order.order_ref, Order.claimed_by).where(
            Order.order_ref.in_([expired, live]))).all())
    assert held == {expired: None, live: "live-worker"}
    code, out, err = run(capsys, "locks", "clear", "--force", "--db", world.url, "--json")
    assert code == 0 and live in json.loads(out)["cleared"] and "warning" in err


# -- process migrate --------------------------------------------------------------------------
def snapshot(url: str) -> list[tuple[Any, ...]]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            rows = []
            for table in (OrderItem, StateHistory, EventTimeout, Order):
                rows += [tuple(map(str, r)) for r in conn.execute(sa.select(table.__table__))]
            return sorted(rows)
    finally:
        eng.dispose()


GOOD_MAP = {"new": "new", "authorized": "authorized", "shipped": "dispatched",
            "delivered": "delivered"}


def test_migrate_refuses_a_bad_map_and_changes_nothing(
    world: World, capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    before = snapshot(world.url)
    unmapped = tmp_path / "unmapped.yaml"
    unmapped.write_text("new: new\nauthorized: authorized\n")
    code, _, err = run(capsys, "process", "migrate", world.p1, world.p2, "--map", unmapped,
                       "--db", world.url, "--processes", world.process_dir)
    assert code != 0 and "'shipped'" in err and "no target" in err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(GOOD_MAP | {"shipped": "sent"}))
    code, _, err = run(capsys, "process", "migrate", world.p1, world.p2, "--map", unknown,
                       "--db", world.url, "--processes", world.process_dir)
    assert code != 0 and "'sent'" in err and "not a state" in err
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(GOOD_MAP))
    code, out, err = run(capsys, "process", "migrate", world.p1, world.p2, "--map", good,
                         "--db", world.url, "--processes", world.process_dir, "--dry-run",
                         "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["dry_run"] is True and plan["items"] == 9
    assert plan["left_in_final_states"] == {"cancelled": 1, "closed": 1}
    assert snapshot(world.url) == before


def test_migrate_moves_items_and_they_continue_in_the_new_process(
    server_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    token = secrets.token_hex(3)
    p1, p2 = copy_processes(tmp_path / "processes", token)
    engine = Engine(server_db_url, process_dir=tmp_path / "processes", registry=registry())
    engine.upgrade_db()
    try:
        refs = populate(engine, p1, token)
        good = tmp_path / "map.yaml"
        good.write_text("\n".join(f"{a}: {b}" for a, b in GOOD_MAP.items()) + "\n")
        code, out, err = run(capsys, "process", "migrate", p1, p2, "--map", good, "--db",
                             server_db_url, "--processes", tmp_path / "processes", "--now",
                             NOW.isoformat(), "--json")
        assert code == 0, err
        assert json.loads(out)["items"] == 9
        order_b = engine.order(refs["B"])
        assert order_b.process == p2
        assert sorted(i.state for i in order_b.items) == ["authorized", "dispatched"]
        order_e = engine.order(refs["E"])
        assert all(i.retry_at is None for i in order_e.items)
        assert [h.event for h in engine.history(refs["B"])][-2:] == ["process migration"] * 2
        with engine.session() as session:
            due = session.scalars(sa.select(EventTimeout.due_at).join(
                OrderItem, OrderItem.id == EventTimeout.item_id).join(Order).where(
                Order.order_ref == refs["A"])).all()
        assert due == [NOW + timedelta(days=10)] * 3
        # they continue: ship and deliver in the new process, then its 10-day timeout closes
        result = engine.trigger("deliver", refs["B"], now=NOW)
        assert [t for _, _, t in result.moved] == ["delivered"]
        engine.tick(now=NOW + timedelta(days=11))
        assert {i.state for i in engine.order(refs["A"]).items} == {"closed"}
        assert engine.order(refs["D"]).process == p1  # its only item is final and not mapped
    finally:
        engine.close()
