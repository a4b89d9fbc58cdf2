"""The engine's console commands end to end: db, order place/show/list/history, event, tick.

Commands run through ``ratepay_oms.cli.main`` (what the ``ratepay-oms`` script calls), so a user
error is checked the way a user sees it: one line on stderr, a non-zero exit, nothing on stdout,
and nothing written to the database. The flows use ``tests/processes/cli/TestInvoice01.yaml``
(no commands: the console is under test here, not RatePAY) on every dialect of
``server_db_url``; a couple of smoke tests start the real ``ratepay-oms`` script and the
tick benchmark in a subprocess.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ratepay_oms.cli import main
from ratepay_oms.cli.tick import parse_iso_time
from ratepay_oms.engine.plugins import ByOrderCommand
from ratepay_oms.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
PROCESSES = Path(__file__).resolve().parent / "processes" / "cli"
PROCESS = "TestInvoice01"
RETRY_PROCESSES = Path(__file__).resolve().parent / "processes" / "cli_retry"
FAILURE = "gateway unreachable (cli test)"

# The shared example order (/work/shared/examples/order-invoice.json), kept here so the tests
# do not depend on a file outside the repository; each test gives it its own order_ref.
EXAMPLE_ORDER: dict[str, Any] = {
    "order_ref": "100045",
    "process": "RatepayInvoice01",
    "currency": "EUR",
    "customer": {
        "customer_ref": "C-3001",
        "first_name": "Erika",
        "last_name": "Mustermann",
        "gender": "F",
        "date_of_birth": "1974-08-12",
        "email": "erika.mustermann@example.org",
        "phone": "030 1234567",
        "ip_address": "203.0.113.7",
        "language": "de",
        "billing_address": {
            "street": "Heidestraße 17",
            "zip_code": "51147",
            "city": "Köln",
            "country_code": "DE",
        },
    },
    "items": [
        {"sku": "SKU-100", "name": 'Mug "Kaffee & Kuchen"', "quantity": 3,
         "unit_price_gross": "12.50", "tax_rate": "19"},
        {"sku": "SKU-200", "name": "Tea pot", "quantity": 1, "unit_price_gross": "49.90",
         "tax_rate": "19", "discount": "-4.90"},
    ],
    "shipping": {"name": "Standard shipping", "unit_price_gross": "4.95", "tax_rate": "19"},
    "discount": {"name": "Voucher WELCOME5", "unit_price_gross": "-5.00", "tax_rate": "19"},
    "payment": {"method": "INVOICE"},
    "device_token": "b2f1c6a0d7e94d1e8f3a2c5b6d7e8f90",
}

OMS_TABLES = ("oms_order", "oms_order_item", "oms_state_history", "oms_transition_log",
              "oms_event_timeout")


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich tables fit 80 columns by default; a wide console keeps cell text whole."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("RATEPAY_OMS_DATABASE_URL", raising=False)
    monkeypatch.delenv("RATEPAY_OMS_PLUGINS", raising=False)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    def run(*args: str) -> Run:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def db(server_db_url: str) -> str:
    """A migrated database of each dialect, shared by the session (tests use own order refs)."""
    assert main(["db", "upgrade", "--db", server_db_url]) == 0
    return server_db_url


def order_file(tmp_path: Path, **changes: Any) -> tuple[Path, str]:
    data = json.loads(json.dumps(EXAMPLE_ORDER))
    data["order_ref"] = f"T-{secrets.token_hex(5)}"
    data["process"] = PROCESS
    data.update(changes)
    path = tmp_path / f"{data['order_ref']}.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    return path, data["order_ref"]


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the OMS tables, to prove a refused command wrote nothing."""
    eng = sa.create_engine(url)
    try:
        meta = sa.MetaData()
        meta.reflect(eng, only=OMS_TABLES)
        with eng.connect() as conn:
            return {
                name: sorted(
                    (tuple(map(str, row)) for row in conn.execute(sa.select(meta.tables[name]))),
                )
                for name in OMS_TABLES
            }
    finally:
        eng.dispose()


def assert_one_line_error(run: Run, *fragments: str) -> None:
    assert run.code != 0, run
    assert run.out == "", run.out
    assert "Traceback" not in run.err
    assert len(run.err.strip().splitlines()) == 1, run.err
    for fragment in fragments:
        assert fragment in run.err, (fragment, run.err)


def engine_args(db: str) -> tuple[str, ...]:
    return ("--db", db, "--processes", str(PROCESSES))


def place(cli, db: str, tmp_path: Path, *extra: str) -> tuple[str, dict[str, Any]]:
    path, ref = order_file(tmp_path)
    run = cli("order", "place", path, *engine_args(db), *extra)
    assert run.code == 0, run.err
    shown = cli("order", "show", ref, "--json", *engine_args(db))
    assert shown.code == 0, shown.err
    return ref, shown.json()


def states(view: dict[str, Any]) -> dict[int, str]:
    return {item["id"]: item["state"] for item in view["items"]}


# -- no database needed --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00", datetime(2024, 5, 1, 12, 0, 0)),
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, 0, 0)),
        ("2024-05-01T14:30:00+02:00", datetime(2024, 5, 1, 12, 30, 0)),
        ("2024-05-01T00:15:00-01:00", datetime(2024, 5, 1, 1, 15, 0)),
        ("2024-05-01", datetime(2024, 5, 1)),
        (" 2024-05-01 08:00 ", datetime(2024, 5, 1, 8, 0)),
    ],
)
def test_now_is_parsed_as_naive_utc(text: str, expected: datetime) -> None:
    parsed = parse_iso_time(text)
    assert parsed == expected
    assert parsed.tzinfo is None


@pytest.mark.parametrize("garbage", ["yesterday", "2024-13-01", "12:00", "", "2024-05-01T25:00"])
def test_tick_rejects_a_garbage_now(cli, garbage: str, tmp_sqlite_url: str) -> None:
    run = cli("tick", "--now", garbage, "--db", tmp_sqlite_url)
    assert run.code == 2
    assert "--now" in run.err and "Traceback" not in run.err
    assert not Path(tmp_sqlite_url.removeprefix("sqlite:///")).exists()


def test_interval_without_loop_is_a_usage_error(cli, tmp_sqlite_url: str) -> None:
    run = cli("tick", "--interval", "5", "--db", tmp_sqlite_url)
    assert run.code == 2
    assert "--loop" in run.err


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("nope://x", "unknown dialect or driver 'nope'"),
        ("::::", "invalid database URL"),
        ("postgresql+nodriver://h/db", "unknown dialect or driver"),
    ],
)
def test_an_invalid_db_url_is_one_clear_line(cli, url: str, fragment: str) -> None:
    for args in (("order", "show", "R1"), ("tick",), ("db", "upgrade"), ("db", "current")):
        assert_one_line_error(cli(*args, "--db", url), fragment)


def test_a_missing_sqlite_file_is_not_created_by_reading(cli, tmp_path: Path) -> None:
    missing = tmp_path / "typo.sqlite"
    run = cli("order", "show", "R1", "--db", f"sqlite:///{missing}")
    assert_one_line_error(run, "no database at", "db upgrade")
    assert not missing.exists()


def test_the_database_url_comes_from_the_environment(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'env.sqlite'}"
    monkeypatch.setenv("RATEPAY_OMS_DATABASE_URL", url)
    assert cli("db", "upgrade").code == 0
    assert (tmp_path / "env.sqlite").exists()
    current = cli("db", "current")
    assert current.code == 0 and current.out.strip() not in ("", "none")


def test_a_database_without_tables_says_to_upgrade(cli, tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite"
    sa.create_engine(f"sqlite:///{path}").connect().close()  # an empty file
    assert cli("db", "current", "--db", f"sqlite:///{path}").out.strip() == "none"
    run = cli("order", "show", "R1", *engine_args(f"sqlite:///{path}"))
    assert_one_line_error(run, "db upgrade")


def test_order_place_names_the_line_and_column_of_broken_json(cli, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "order_ref": "X1",\n  "items": [,]\n}\n', encoding="utf-8")
    run = cli("order", "place", path, "--db", f"sqlite:///{tmp_path / 'none.sqlite'}")
    assert_one_line_error(run, f"{path}:3:13", "invalid JSON")


def test_every_command_has_an_example_in_its_help(cli) -> None:
    for args in (
        ("db",), ("db", "upgrade"), ("db", "current"), ("order",), ("order", "place"),
        ("order", "show"), ("order", "list"), ("order", "history"), ("event",), ("tick",),
    ):
        run = cli(*args, "--help")
        assert run.code == 0, (args, run.err)
        assert "Example:" in run.out, args
        assert "ratepay-oms " + args[0] in run.out.split("Example:")[1], args


# -- against a real database ---------------------------------------------------------------


def test_db_upgrade_prints_the_revision_db_current_shows(cli, tmp_sqlite_url: str) -> None:
    up = cli("db", "upgrade", "--db", tmp_sqlite_url)
    assert up.code == 0, up.err
    revision = up.out.strip().rsplit(" ", 1)[-1]
    assert revision and revision != "None"
    assert cli("db", "current", "--db", tmp_sqlite_url).out.strip() == revision
    assert cli("db", "upgrade", "--db", tmp_sqlite_url).out == up.out  # idempotent


def test_place_tick_event_show_history_flow(cli, db: str, tmp_path: Path) -> None:
    path, ref = order_file(tmp_path)
    placed = cli("order", "place", path, *engine_args(db))
    assert placed.code == 0, placed.err
    assert ref in placed.out and "SKU-100" in placed.out and "SKU-200" in placed.out

    view = cli("order", "show", ref, "--json", *engine_args(db)).json()
    assert view["order_ref"] == ref and view["process"] == PROCESS
    assert [i["sku"] for i in view["items"]] == ["SKU-100"] * 3 + ["SKU-200"]
    assert set(states(view).values()) == {"new"}
    first, *rest = sorted(states(view))

    ticked = cli("tick", "--now", "2030-01-01T12:00:00Z", *engine_args(db))
    assert ticked.code == 0, ticked.err
    assert ticked.out.strip()  # the one-line summary
    assert set(states(cli("order", "show", ref, "--json", *engine_args(db)).json()).values()) \
        == {"authorized"}

    shipped = cli("event", "ship", ref, "--item", first, *engine_args(db))
    assert shipped.code == 0, shipped.err
    assert f"item {first}: authorized → shipped" in shipped.out
    after_ship = states(cli("order", "show", ref, "--json", *engine_args(db)).json())
    assert after_ship[first] == "delivered"  # the on-enter 'deliver' cascade ran
    assert {after_ship[i] for i in rest} == {"authorized"}

    cancelled = cli("event", "cancel", ref, *engine_args(db))
    assert cancelled.code == 0, cancelled.err
    for item_id in rest:
        assert f"item {item_id}: authorized → cancelled" in cancelled.out

    # 'close' is a 30-day timeout of 'delivered': a tick 31 days later fires it.
    later = cli("tick", "--now", "2031-06-01T00:00:00", "--json", *engine_args(db))
    assert later.code == 0, later.err
    assert later.json()["items_moved"] >= 1
    final = states(cli("order", "show", ref, "--json", *engine_args(db)).json())
    assert final == {first: "closed", **{i: "cancelled" for i in rest}}

    table = cli("order", "show", ref, *engine_args(db))
    assert table.code == 0 and "closed" in table.out and "cancelled" in table.out

    history = cli("order", "history", ref, "--json", *engine_args(db))
    assert history.code == 0, history.err
    moves = [(h["item_id"], h["from_state"], h["to_state"]) for h in history.json()]
    assert moves.count((first, None, "new")) == 1
    assert [m[1:] for m in moves if m[0] == first] == [
        (None, "new"), ("new", "authorized"), ("authorized", "shipped"),
        ("shipped", "delivered"), ("delivered", "closed"),
    ]
    assert [m[1:] for m in moves if m[0] == rest[0]] == [
        (None, "new"), ("new", "authorized"), ("authorized", "cancelled"),
    ]
    human = cli("order", "history", ref, *engine_args(db))
    assert "shipped → delivered" in human.out and "deliver" in human.out


def test_order_list_filters_by_state_and_process(cli, db: str, tmp_path: Path) -> None:
    ref, _ = place(cli, db, tmp_path)
    listed = cli("order", "list", "--process", PROCESS, "--json", *engine_args(db))
    assert listed.code == 0, listed.err
    assert ref in [o["order_ref"] for o in listed.json()]
    assert ref in [
        o["order_ref"]
        for o in cli("order", "list", "--state", "new", "--json", *engine_args(db)).json()
    ]
    other = cli("order", "list", "--process", "NoSuchProcess01", "--json", *engine_args(db))
    assert other.code == 0 and other.json() == []
    human = cli("order", "list", "--process", PROCESS, *engine_args(db))
    assert ref in human.out and "new ×4" in human.out


def test_place_no_fire_stores_without_moving(cli, db: str, tmp_path: Path) -> None:
    _, view = place(cli, db, tmp_path, "--no-fire")
    assert set(states(view).values()) == {"new"}
    assert len(view["items"]) == 4


class AlwaysFails(ByOrderCommand):
    """A by-order command that always raises, for the retry/error column."""

    def run(self, ctx: Any, order: Any, items: Any) -> None:
        raise ConnectionError(FAILURE)


def register_failing_command(registry: Any) -> None:
    """Loaded by the engine through ``$RATEPAY_OMS_PLUGINS``, as a shop would."""
    registry.register_by_order("CliTest/AlwaysFails", AlwaysFails())


def test_a_failing_command_shows_its_retry_and_error(
    cli, db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATEPAY_OMS_PLUGINS", "tests.test_cli_engine:register_failing_command")
    args = ("--db", db, "--processes", str(RETRY_PROCESSES))
    path, ref = order_file(tmp_path, process="TestRetry01")
    assert cli("order", "place", path, *args).code == 0

    fired = cli("event", "invoice", ref, *args)
    assert fired.code == ExitCode.GATEWAY_FAILED  # done, but its command failed
    assert FAILURE in fired.err and "Traceback" not in fired.err
    view = cli("order", "show", ref, "--json", *args).json()
    assert {i["state"] for i in view["items"]} == {"new"}
    assert {i["attempts"] for i in view["items"]} == {1}
    assert all(FAILURE in i["last_error"] and i["retry_at"] for i in view["items"])

    table = cli("order", "show", ref, *args)
    assert "retry " in table.out and "(attempt 1)" in table.out and FAILURE in table.out

    retried = cli("tick", "--now", "2099-01-01T00:00:00Z", "--json", *args)
    assert retried.code == ExitCode.GATEWAY_FAILED, retried.err  # the retry failed again
    assert retried.json()["errors"] >= 1
    assert {i["attempts"] for i in cli("order", "show", ref, "--json", *args).json()["items"]} \
        == {2}


# -- refusals write nothing ----------------------------------------------------------------


def test_a_missing_field_is_named_and_nothing_is_written(cli, db: str, tmp_path: Path) -> None:
    data = json.loads(json.dumps(EXAMPLE_ORDER))
    del data["customer"]["billing_address"]["city"]
    path, _ = order_file(tmp_path, customer=data["customer"])
    before = snapshot(db)
    assert_one_line_error(
        cli("order", "place", path, *engine_args(db)), "customer.billing_address.city"
    )
    assert snapshot(db) == before


def test_an_invalid_field_is_named_and_nothing_is_written(cli, db: str, tmp_path: Path) -> None:
    items = json.loads(json.dumps(EXAMPLE_ORDER["items"]))
    items[1]["unit_price_gross"] = "abc"
    path, _ = order_file(tmp_path, items=items)
    before = snapshot(db)
    assert_one_line_error(
        cli("order", "place", path, *engine_args(db)), "items[1].unit_price_gross"
    )
    assert snapshot(db) == before


def test_an_unknown_process_is_refused(cli, db: str, tmp_path: Path) -> None:
    path, _ = order_file(tmp_path, process="NoSuchProcess01")
    before = snapshot(db)
    assert_one_line_error(cli("order", "place", path, *engine_args(db)), "NoSuchProcess01")
    assert snapshot(db) == before


def test_a_duplicate_order_ref_is_refused(cli, db: str, tmp_path: Path) -> None:
    path, ref = order_file(tmp_path)
    assert cli("order", "place", path, *engine_args(db)).code == 0
    before = snapshot(db)
    assert_one_line_error(cli("order", "place", path, *engine_args(db)), ref)
    assert snapshot(db) == before


def test_a_non_manual_event_is_refused(cli, db: str, tmp_path: Path) -> None:
    ref, _ = place(cli, db, tmp_path)
    before = snapshot(db)
    assert_one_line_error(cli("event", "close", ref, *engine_args(db)), "close")
    assert_one_line_error(cli("event", "no-such-event", ref, *engine_args(db)), "no-such-event")
    assert snapshot(db) == before


def test_an_event_for_an_item_in_the_wrong_state_is_refused(
    cli, db: str, tmp_path: Path
) -> None:
    ref, view = place(cli, db, tmp_path)  # items in 'new': ship is not accepted there
    item = view["items"][0]["id"]
    before = snapshot(db)
    assert_one_line_error(cli("event", "ship", ref, "--item", item, *engine_args(db)), str(item))
    assert snapshot(db) == before
    _, other = place(cli, db, tmp_path)
    before = snapshot(db)
    foreign = other["items"][0]["id"]
    refused = cli("event", "ship", ref, "--item", foreign, *engine_args(db))
    assert refused.code != 0 and "Traceback" not in refused.err
    assert snapshot(db) == before


def test_an_unknown_order_is_one_line(cli, db: str) -> None:
    for args in (("order", "show", "NO-SUCH-REF"), ("order", "history", "NO-SUCH-REF"),
                 ("event", "ship", "NO-SUCH-REF")):
        assert_one_line_error(cli(*args, *engine_args(db)), "NO-SUCH-REF")


# -- real processes: the script and the benchmark ------------------------------------------


def _script() -> list[str]:
    return [sys.executable, "-c", "import sys; from ratepay_oms.cli import main; sys.exit(main())"]


def test_tick_loop_stops_cleanly_on_sigterm(tmp_sqlite_url: str, tmp_path: Path) -> None:
    assert main(["db", "upgrade", "--db", tmp_sqlite_url]) == 0
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        [*_script(), "tick", "--loop", "--interval", "0.2", "--json", "--db", tmp_sqlite_url,
         "--processes", str(PROCESSES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        first = _read_json_document(proc.stdout)
        assert "items_moved" in first
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_a_loop_worker_that_did_work_ticks_again_without_waiting(
    cli, tmp_sqlite_url: str, tmp_path: Path
) -> None:
    """Three due orders, one per tick (``--limit 1``; a tick never splits an order), an
    interval of 10 minutes: a worker that waited the interval after each busy tick would need
    20 minutes; it ticks again at once while there is work, and only the idle tick waits."""
    assert main(["db", "upgrade", "--db", tmp_sqlite_url]) == 0
    refs = []
    for _ in range(3):
        path, ref = order_file(tmp_path)
        placed = cli("order", "place", path, "--no-fire", *engine_args(tmp_sqlite_url))
        assert placed.code == 0, placed.err
        refs.append(ref)
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        [*_script(), "tick", "--loop", "--interval", "600", "--limit", "1", "--json",
         *engine_args(tmp_sqlite_url)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    states: set[str] = set()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and states != {"authorized"}:
            time.sleep(0.2)
            states = set()
            for ref in refs:
                shown = cli("order", "show", ref, "--json", *engine_args(tmp_sqlite_url))
                states |= {i["state"] for i in shown.json()["items"]}
        time.sleep(0.5)  # the idle tick after them
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert states == {"authorized"}, "the worker waited its interval after a busy tick"
    assert proc.returncode == 0, err
    decoder, moved, at = json.JSONDecoder(), [], 0
    while out[at:].strip():
        document, at = decoder.raw_decode(out, at + len(out[at:]) - len(out[at:].lstrip()))
        moved.append(document["items_moved"])
    assert moved == [4, 4, 4, 0]  # an order (4 items) per tick, three in a row, then idle


def _read_json_document(stream: Any) -> dict[str, Any]:
    """Read lines until they form one JSON document (the first tick's result)."""
    buffer = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        buffer += line
        try:
            return json.loads(buffer)
        except json.JSONDecodeError:
            continue
    raise AssertionError(f"no JSON document from the tick loop: {buffer!r}")


def test_the_ratepay_oms_script_runs(tmp_sqlite_url: str, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("ratepay-oms")
    command = [str(script)] if script.exists() else _script()
    done = subprocess.run(
        [*command, "order", "show", "X", "--db", "nope://"], capture_output=True, text=True,
        cwd=tmp_path, timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: invalid database URL 'nope://': unknown dialect or driver 'nope'"
    ]


@pytest.fixture
def bench_output(tmp_path: Path) -> Iterator[subprocess.CompletedProcess[str]]:
    yield subprocess.run(
        [sys.executable, str(REPO / "bench" / "tick.py"), "--items", "200", "--db", "sqlite"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )


def test_the_tick_benchmark_still_runs(bench_output: subprocess.CompletedProcess[str]) -> None:
    assert bench_output.returncode == 0, bench_output.stderr
    lines = bench_output.stdout.splitlines()
    assert "[sqlite 200] moved by tick: 200" in lines
    assert not [line for line in lines if "WARNING" in line]  # every write of both runs is there
    ratio = [line for line in lines if line.startswith("[sqlite 200] ratio tick/floor: ")]
    assert len(ratio) == 1 and float(ratio[0].rsplit(" ", 1)[1]) > 0
    peak = [line for line in lines if line.startswith("[sqlite 200] tick :")]
    assert len(peak) == 1 and "peak RSS" in peak[0]
