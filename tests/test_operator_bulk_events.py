"""Bulk events (issue 13, point 2): `event EVENT --from-csv FILE [--dry-run] [--json]`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from ratepay_oms import Engine
from ratepay_oms.cli import main
from ratepay_oms.console.bulk import (
    ACCEPTED,
    FAILED,
    REFUSED,
    WOULD_FIRE,
    BulkFileError,
    _trigger_takes_data,
    parse_event_rows,
    read_event_rows,
    run_bulk_event,
)
from ratepay_oms.persistence.models import Order, OrderItem, StateHistory, TransitionLog
from tests.operator_helpers import PROCESS, PROCESS_DIR, new_ref, operator_engine
from tests.plugins_for_tests import command_runs, order_doc

T0 = datetime(2025, 6, 2, 12, 0, 0)


# -- reading the file ---------------------------------------------------------------------------
def test_rows_with_and_without_a_header() -> None:
    rows = parse_event_rows("A-1,3\nA-1,4\n\nB-2\n")
    assert [(r.line, r.order_ref, r.item_id, r.problem) for r in rows] == [
        (1, "A-1", 3, None), (2, "A-1", 4, None), (4, "B-2", None, None)
    ]
    rows = parse_event_rows("\ufefforder_ref,item_id,invoice_id,carrier\nA-1,,INV-1,DHL\n"
                            "A-1,7,INV-2,\n")
    assert [(r.line, r.item_id, dict(r.data)) for r in rows] == [
        (2, None, {"invoice_id": "INV-1", "carrier": "DHL"}), (3, 7, {"invoice_id": "INV-2"})
    ]


def test_a_quoted_cell_over_two_lines_keeps_the_line_numbers() -> None:
    rows = parse_event_rows('order_ref,item_id,note\nA-1,1,"two\nlines"\nB-2,2,x\n')
    assert [(r.line, r.order_ref, dict(r.data)) for r in rows] == [
        (2, "A-1", {"note": "two\nlines"}), (4, "B-2", {"note": "x"})
    ]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("A-1,1,INV\n", 1, "3 cells: name the extra columns in a header row"),
        ("A-1,0\n", 1, "item_id '0' is not a positive number"),
        ("A-1,x\n", 1, "item_id 'x' is not a positive number"),
        (",3\n", 1, "order_ref is empty"),
        ("A-1,3\nA-1,3\n", 2, "duplicate: item 3 of order A-1 is on line 1 already"),
        ("A-1\nA-1\n", 2, "duplicate: order A-1 is on line 1 already"),
        ("order_ref,item_id\nA-1,1,2\n", 2, "3 cells: name the extra columns"),
        ("order_ref,item_id,x\nA-1,1,2,3\n", 2, "4 cells: more cells than the header"),
    ],
)
def test_a_bad_row_is_refused_on_its_own(text: str, line: int, problem: str) -> None:
    rows = parse_event_rows(text)
    bad = [r for r in rows if r.problem]
    assert [r.line for r in bad] == [line]
    assert bad[0].problem is not None and bad[0].problem.startswith(problem)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no rows"),
        ("\n\n", "no rows"),
        ("order_ref,item_id\n", "only a header"),
        ("order_ref,item_id,x,x\nA,1,2,3\n", "column 'x' appears twice"),
        ("order_ref,,x\nA,1,2\n", "empty column name"),
        ("order_ref,x,item_id\nA,1,2\n", "'item_id' must be the second column"),
    ],
)
def test_an_unusable_file_is_refused_as_a_whole(text: str, message: str) -> None:
    with pytest.raises(BulkFileError, match=message):
        parse_event_rows(text)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BulkFileError, match="no such file"):
        read_event_rows(tmp_path / "missing.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("Bestellung-ä,1\n".encode("latin-1"))
    with pytest.raises(BulkFileError, match="not UTF-8"):
        read_event_rows(latin)


# -- firing -----------------------------------------------------------------------------------
@pytest.fixture
def engine(server_db_url: str) -> Iterator[Engine]:
    with operator_engine(server_db_url, cleared={"OK"}) as eng:
        yield eng


def approved(engine: Engine, qty: int = 2) -> tuple[str, list[int]]:
    """An order whose items sit in 'approved' (manual 'prepare' → ready, command Test/Flaky)."""
    ref = new_ref()
    view = engine.place_order(order_doc(ref, PROCESS, (("OK", qty),)), now=T0)
    for item in view.items:  # not a tick: that would also work on other tests' rows
        engine.force_move(ref, item.id, "approved", reason="test set-up", now=T0)
    assert {i.state for i in engine.order(ref).items} == {"approved"}
    return ref, [i.id for i in view.items]


def audit(engine: Engine) -> tuple[int, int]:
    with engine.session() as s:
        return (int(s.scalar(select(func.count()).select_from(StateHistory)) or 0),
                int(s.scalar(select(func.count()).select_from(TransitionLog)) or 0))


def states(engine: Engine, ref: str) -> dict[int, str]:
    return {i.id: i.state for i in engine.order(ref).items}


def test_dry_run_reports_what_would_happen_and_writes_nothing(engine: Engine) -> None:
    ref, (a, b) = approved(engine)
    text = f"order_ref,item_id\n{ref},{a}\n{ref},999999\nNOPE,\n"
    before = audit(engine)
    report = run_bulk_event(engine, "prepare", parse_event_rows(text), dry_run=True)
    assert [(r.line, r.status) for r in report.rows] == [
        (2, WOULD_FIRE), (3, REFUSED), (4, REFUSED)
    ]
    assert report.rows[0].would == [{"item_id": a, "from": "approved", "command": "Test/Flaky",
                                     "targets": [{"to": "ready", "if": None}]}]
    assert report.rows[1].reason == f"cannot fire 'prepare': item 999999 is not an item of " \
        f"order {ref}"
    assert report.rows[2].reason == "no order 'NOPE'"
    assert not report.ok
    assert audit(engine) == before
    assert states(engine, ref) == {a: "approved", b: "approved"}
    assert command_runs(engine.database_url) == []


def test_rows_are_fired_checked_one_by_one_and_merged_per_order(engine: Engine) -> None:
    one, (a1, a2) = approved(engine)
    two, (b1, b2) = approved(engine)
    three, _ = approved(engine, qty=1)
    review = new_ref()
    engine.place_order(order_doc(review, PROCESS, (("NO", 1),)), now=T0)
    text = "\n".join([f"{one},{a1}", f"{one},{a2}", f"{two}", f"{three},123456789",
                      f"{review}", ""])
    report = run_bulk_event(engine, "prepare", parse_event_rows(text), concurrency=4,
                            now=T0 + timedelta(hours=1))
    status = {r.line: (r.status, r.reason) for r in report.rows}
    assert status[1][0] == status[2][0] == status[3][0] == ACCEPTED
    assert status[4] == (REFUSED, f"cannot fire 'prepare': item 123456789 is not an item of "
                                  f"order {three}")
    assert status[5][0] == REFUSED and "accepts no manual event" in (status[5][1] or "")
    assert report.rows[0].moved == [(a1, "approved", "ready")]
    assert sorted(report.rows[2].items) == [b1, b2]
    assert states(engine, one) == {a1: "ready", a2: "ready"}
    assert states(engine, two) == {b1: "ready", b2: "ready"}
    runs = command_runs(engine.database_url)
    by_order: dict[str, set[str]] = {}
    for run in runs:
        by_order.setdefault(run["order_ref"], set()).add(run["call_id"])
    # the two rows of order one went out as one event: one command call for both items
    assert {k: len(v) for k, v in by_order.items()} == {one: 1, two: 1}
    assert report.counts() == {ACCEPTED: 3, REFUSED: 2, FAILED: 0, WOULD_FIRE: 0}


def test_a_failing_command_marks_its_rows_failed_and_schedules_a_retry(engine: Engine) -> None:
    ref, (a, b) = approved(engine)
    engine.services["flaky"] = {"failures": 1}
    report = run_bulk_event(engine, "prepare", parse_event_rows(f"{ref}\n"), now=T0)
    [row] = report.rows
    assert row.status == FAILED and "gateway unreachable (test)" in (row.reason or "")
    with engine.session() as s:
        retries = {i.id: i.retry_event for i in s.scalars(
            select(OrderItem).where(OrderItem.id.in_([a, b])))}
    assert retries == {a: "prepare", b: "prepare"}


def test_event_data_columns_go_to_the_trigger_or_are_refused_clearly(engine: Engine) -> None:
    ref, (a, _) = approved(engine)
    rows = parse_event_rows(f"order_ref,item_id,invoice_id\n{ref},{a},INV-7\n")
    report = run_bulk_event(engine, "prepare", rows, now=T0)
    [row] = report.rows
    if _trigger_takes_data(engine):
        assert row.status == ACCEPTED and row.moved == [(a, "approved", "ready")]
    else:
        assert row.status == REFUSED
        assert row.reason == "event data columns need an engine whose trigger takes data"
        assert states(engine, ref)[a] == "approved"


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_event_from_csv_cli_report_and_exit_status(
    engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("RATEPAY_OMS_PLUGINS", "tests.operator_helpers:register")
    ref, (a, b) = approved(engine)
    base = ["--db", engine.database_url, "--processes", PROCESS_DIR]
    good = tmp_path / "good.csv"
    good.write_text(f"order_ref,item_id\n{ref},{a}\n", encoding="utf-8")
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(f"{ref},{b}\nNOPE\n", encoding="utf-8")

    code, out, err = run(capsys, "event", "prepare", "--from-csv", good, "--dry-run", *base)
    assert code == 0, err
    assert "would fire" in out and f"item {a}: approved → ready via Test/Flaky" in out
    assert "(dry run: nothing written)" in out
    assert states(engine, ref)[a] == "approved"

    code, out, err = run(capsys, "event", "prepare", "--from-csv", good, "--json", *base)
    assert code == 0, err
    data = json.loads(out)
    assert data["ok"] is True and data["counts"]["accepted"] == 1
    assert data["rows"][0]["moved"] == [{"item_id": a, "from": "approved", "to": "ready"}]

    code, out, err = run(capsys, "event", "prepare", "--from-csv", mixed, *base)
    assert code == 1
    assert "accepted" in out and "no order 'NOPE'" in out
    assert "1 of 2 rows were refused or failed" in err and "Traceback" not in err
    assert states(engine, ref) == {a: "ready", b: "ready"}

    code, _, err = run(capsys, "event", "prepare", ref, "--from-csv", good, *base)
    assert code == 2 and "not both" in err
    code, _, err = run(capsys, "event", "prepare", "--dry-run", *base)
    assert code == 2 and "go with --from-csv" in err
    code, _, err = run(capsys, "event", "prepare", "--from-csv", tmp_path / "nope.csv", *base)
    assert code == 1 and "no such file" in err


def test_trigger_many_decides_orders_in_chunks_and_keeps_each_orders_turn(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ratepay_oms.engine.many as many
    from ratepay_oms.engine.many import EventRequest

    monkeypatch.setattr(many, "CHUNK", 2)
    orders = [approved(engine) for _ in range(3)]
    (r1, (a1, a2)), (r2, _), (r3, _) = orders
    leased = new_ref()
    engine.place_order(order_doc(leased, PROCESS, (("OK", 1),)), now=T0)
    other = Engine(engine.database_url, definitions=engine.definitions(),
                   registry=engine.registry, worker_id="other-worker")
    try:
        with engine.session() as s:
            leased_id = s.scalar(select(Order.id).where(Order.order_ref == leased))
        assert other.claims.claim([leased_id]) == [leased_id]
        requests = [EventRequest(r1, (a1,)), EventRequest(r2), EventRequest(leased),
                    EventRequest(r1, (a2,)), EventRequest(r3), EventRequest("NOPE"),
                    EventRequest(leased)]
        outcomes = engine.trigger_many("prepare", requests, now=T0)
    finally:
        other.claims.release([leased_id])
        other.close()
    assert [o.busy for o in outcomes] == [False, False, True, False, False, False, True]
    assert outcomes[0].moved == [(a1, "approved", "ready")]
    assert outcomes[3].moved == [(a2, "approved", "ready")]  # the second wave of order r1
    assert len(outcomes[1].moved) == 2 and len(outcomes[4].moved) == 2
    assert outcomes[5].refused == "no order 'NOPE'"
    assert {i.state for r, _ in orders for i in engine.order(r).items} == {"ready"}
    runs = command_runs(engine.database_url)
    assert sorted({r["order_ref"] for r in runs}) == sorted([r1, r2, r3])
