"""SLA rules per state (issue 13, point 4): the YAML keys, `process check`, `alerts`, `matrix`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ratepay_oms import Engine
from ratepay_oms.cli import main
from ratepay_oms.console.alerts import BREACH_EXIT_CODE, sla_alerts
from ratepay_oms.console.matrix import build_matrix
from ratepay_oms.process import ProcessDefinitionError, check_files, load_process, parse_timeout
from ratepay_oms.process.model import SlaDef
from tests.operator_helpers import PROCESS, PROCESS_DIR, new_ref, operator_engine
from tests.plugins_for_tests import order_doc

T0 = datetime(2025, 6, 2, 12, 0, 0)


def write(tmp_path: Path, states: str) -> Path:
    path = tmp_path / "Sla01.yaml"
    path.write_text(
        "process: Sla01\ninitial: a\n"
        "states:\n" + states + "\n"
        "  b: {}\n"
        "transitions:\n"
        "  - {source: a, target: b, event: go}\n"
        "events:\n"
        "  go: {manual: true}\n",
        encoding="utf-8",
    )
    return path


# -- the YAML keys and their checks ------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [("1d", timedelta(days=1)), ("3d 12h", timedelta(days=3, hours=12)),
     ("30m", timedelta(minutes=30)), ("2w", timedelta(weeks=2)), ("10 min", timedelta(minutes=10)),
     ("45s", timedelta(seconds=45))],
)
def test_durations_take_short_units_too(text: str, expected: timedelta) -> None:
    assert parse_timeout(text) == expected


@pytest.mark.parametrize("text", ["2 months", "5 sec", "1dd", "d1"])
def test_durations_refuse_what_is_not_a_unit(text: str) -> None:
    with pytest.raises(ValueError, match="bad timeout"):
        parse_timeout(text)


def test_sla_is_read_into_the_state(tmp_path: Path) -> None:
    d = load_process(write(tmp_path, "  a:\n    sla: {warn: 1d, breach: 3 days}"))
    sla = d.states["a"].sla
    assert sla == SlaDef(timedelta(days=1), timedelta(days=3), sla.location)
    assert sla.location is not None and sla.location.line == 5
    assert d.states["b"].sla is None
    assert sla.level(timedelta(hours=23)) is None
    assert sla.level(timedelta(days=1)) == "warn"
    assert sla.level(timedelta(days=3)) == "breach"


@pytest.mark.parametrize(
    ("states", "line", "message"),
    [
        ("  a:\n    sla: {warn: 3d, breach: 1d}", 5, "warn (3 days) must be shorter than breach"),
        ("  a:\n    sla: {warn: soon}", 5, "bad sla warn 'soon'"),
        ("  a:\n    sla: {}", 5, "needs 'warn', 'breach' or both"),
        ("  a:\n    sla: {breech: 1d}", 5, "unknown key 'breech'"),
        ("  a:\n    sla: 3d", 5, "must be a mapping"),
        ("  a:\n    sla:\n      warn: [1d]", 6, "must be a duration"),
    ],
)
def test_bad_sla_is_an_error_with_file_and_line(
    tmp_path: Path, states: str, line: int, message: str
) -> None:
    path = write(tmp_path, states)
    with pytest.raises(ProcessDefinitionError) as info:
        load_process(path)
    text = str(info.value)
    assert f"{path}:{line}: " in text
    assert message in text


def test_sla_on_a_final_state_is_refused_by_process_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "  a: {}")
    path.write_text(
        path.read_text(encoding="utf-8").replace("  b: {}", "  b:\n    sla: {breach: 1d}"),
        encoding="utf-8",
    )
    problems = check_files([path])
    assert [(p.line, p.is_error) for p in problems] == [(6, True)]
    assert "is final" in problems[0].message
    code = main(["process", "check", str(path)])
    out, err = capsys.readouterr()
    assert code != 0
    assert f"{path}:6: error: state 'b' has an 'sla' but is final" in out + err


# -- alerts and the matrix -----------------------------------------------------------------------
@pytest.fixture
def engine(server_db_url: str) -> Iterator[Engine]:
    with operator_engine(server_db_url) as eng:
        yield eng


def populate(engine: Engine) -> dict[str, str]:
    """review: 2 items 4 days (breach), 1 item 2 days (warn), 1 item 1 hour (fine);
    approved (no SLA): 1 item 10 days; ready: breach at 2 hours."""
    refs = {k: new_ref() for k in ("old", "mid", "new", "appr", "ready")}
    engine.place_order(order_doc(refs["old"], PROCESS, (("A", 2),)), now=T0 - timedelta(days=4))
    engine.place_order(order_doc(refs["mid"], PROCESS, (("A", 1),)), now=T0 - timedelta(days=2))
    engine.place_order(order_doc(refs["new"], PROCESS, (("A", 1),)), now=T0 - timedelta(hours=1))
    for name, days in (("appr", 10), ("ready", 1)):
        view = engine.place_order(order_doc(refs[name], PROCESS, (("OK", 1),)),
                                  now=T0 - timedelta(days=days))
        engine.force_move(refs[name], view.items[0].id, "approved", reason="test set-up",
                          now=T0 - timedelta(days=days))
    engine.trigger("prepare", refs["ready"], now=T0 - timedelta(hours=3))
    return refs


def test_alerts_count_items_past_each_limit_with_the_oldest(engine: Engine) -> None:
    refs = populate(engine)
    report = sla_alerts(engine, engine.definitions(), now=T0)
    found = {(a.process, a.state): a for a in report.alerts}
    assert set(found) == {(PROCESS, "review"), (PROCESS, "ready")}
    review = found[(PROCESS, "review")]
    assert (review.breach, review.warn, review.level) == (2, 1, "breach")
    assert review.oldest_order_ref == refs["old"]
    assert review.oldest_waited == timedelta(days=4)
    ready = found[(PROCESS, "ready")]
    assert (ready.breach, ready.warn, ready.oldest_order_ref) == (1, 0, refs["ready"])
    assert report.breached and report.exit_code == BREACH_EXIT_CODE
    assert report.checked == 3
    # two days earlier the two oldest items had waited 2 days (warn), nothing 3 days
    earlier = sla_alerts(engine, engine.definitions(), now=T0 - timedelta(days=2))
    assert [(a.state, a.warn, a.breach) for a in earlier.alerts] == [("review", 2, 0)]
    assert not earlier.breached and earlier.exit_code == 0


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_alerts_cli_exit_status_says_whether_anything_breaches(
    engine: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    refs = populate(engine)
    base = ["alerts", "--db", engine.database_url, "--processes", PROCESS_DIR]
    code, out, err = run(capsys, *base, "--json", "--now", T0.isoformat())
    assert code == BREACH_EXIT_CODE, err
    data = json.loads(out)
    assert data["breached"] is True and data["totals"] == {"warn": 1, "breach": 3}
    review = next(a for a in data["alerts"] if a["state"] == "review")
    assert review["limits"] == {"warn": "1 day", "breach": "3 days"}
    assert review["oldest"]["order_ref"] == refs["old"]
    assert review["oldest"]["waited"] == "4 days"

    code, out, _ = run(capsys, *base, "--now", T0.isoformat())
    assert code == BREACH_EXIT_CODE
    assert "breach" in out and refs["old"] in out

    code, out, _ = run(capsys, *base, "--now", (T0 - timedelta(days=2)).isoformat())
    assert code == 0
    assert "warn" in out and "review" in out

    code, out, _ = run(capsys, *base, "--now", (T0 - timedelta(days=11)).isoformat())
    assert code == 0
    assert out.startswith("no item past its SLA")


def test_matrix_marks_cells_past_their_sla(
    engine: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    populate(engine)
    matrix = build_matrix(engine, now=T0, process=PROCESS, definitions=engine.definitions())
    cells = {c.state: c for c in matrix.processes[0].states}
    assert (cells["review"].sla_breach, cells["review"].sla_warn) == (2, 1)
    assert cells["review"].sla == "breach" and cells["review"].attention
    assert cells["approved"].sla is None
    assert cells["review"].to_json()["sla"] == {"level": "breach", "warn": 1, "breach": 2}
    code, out, _ = run(capsys, "matrix", "--db", engine.database_url, "--processes", PROCESS_DIR,
                       "--process", PROCESS, "--now", T0.isoformat())
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert "breach 2 warn 1" in rows["review"]
    assert "breach" not in rows["approved"] and "warn" not in rows["approved"]
