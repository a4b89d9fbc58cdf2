"""A new user's path: exit codes that mean something, refusals where people look, one line for
every set-up mistake, the same settings for the console and ``Engine(url)``, a quiet pipe.

The gateway is the sandbox on loopback (real HTTP); the database is each dialect asked for.
The wheel itself is built and installed in a fresh venv by ``.ci/run`` (it needs the network
for the dependencies); ``test_an_installed_layout_finds_its_processes_and_migrations`` runs the
same lookup on a copy of the package laid out as the wheel lays it out.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ratepay_oms import Engine
from ratepay_oms.cli import COMMANDS, _mount, cli, main
from ratepay_oms.errors import ExitCode
from ratepay_oms.plugins.ratepay.commands import SERVICE_NAME
from ratepay_oms.ratepay import RatepaySettings
from ratepay_oms.sandbox.running import RunningSandbox, start_sandbox

REPO = Path(__file__).resolve().parents[1]
ORDER = json.loads((REPO / "tests" / "data" / "order-invoice.json").read_text(encoding="utf-8"))
MARIADB_ADMIN_URL = os.environ.get(
    "RATEPAY_OMS_TEST_MARIADB_URL", "mysql+pymysql://root:@127.0.0.1:3306/test"
)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("RATEPAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)  # no stray ./ratepay-oms.toml or ./processes


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]):
    def call(*args: str) -> Run:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Run(int(code), captured.out, captured.err)

    return call


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningSandbox]:
    running = start_sandbox()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def migrated(server_db_url: str) -> str:
    assert main(["db", "upgrade", "--db", server_db_url]) == 0
    return server_db_url


def configure(monkeypatch: pytest.MonkeyPatch, gateway: RunningSandbox, **override: str) -> None:
    values = {**gateway.settings, **override}
    for key, value in values.items():
        monkeypatch.setenv(f"RATEPAY_{key}", value)


def order_json(tmp_path: Path, **changes: Any) -> tuple[Path, str]:
    data = json.loads(json.dumps(ORDER)) | {"order_ref": f"N-{secrets.token_hex(4)}"} | changes
    path = tmp_path / f"{data['order_ref']}.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path, data["order_ref"]


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# -- exit codes -------------------------------------------------------------------------------


def test_the_readme_exit_code_table_is_the_exit_code_enum() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- exit-codes -->")[1]
    rows = re.findall(r"^\| `(\d+)` \| ", table, flags=re.MULTILINE)
    assert [int(r) for r in rows] == [int(c) for c in ExitCode]


def test_tick_on_a_database_that_does_not_answer_exits_3(run) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    for url in (f"postgresql+psycopg://postgres@127.0.0.1:{port}/x",
                f"mysql+pymysql://root@127.0.0.1:{port}/x"):
        result = run("tick", "--db", url)
        assert result.code == ExitCode.DATABASE_UNAVAILABLE, result
        assert "unavailable" in one_line(result.err)


def test_tick_on_a_schema_never_upgraded_exits_3(run, fresh_db_url: str) -> None:
    engine = sa.create_engine(fresh_db_url)
    with engine.begin() as conn:  # the database exists (a SQLite file too), with no schema
        conn.execute(sa.text("CREATE TABLE unrelated (a INTEGER)"))
    engine.dispose()
    result = run("tick", "--db", fresh_db_url)
    assert result.code == ExitCode.DATABASE_UNAVAILABLE, result
    assert "ratepay-oms db upgrade" in one_line(result.err)


def test_tick_on_a_schema_behind_or_ahead_says_which(run, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'oms.sqlite'}"
    assert run("db", "upgrade", "--db", url).code == ExitCode.OK
    engine = sa.create_engine(url)
    for revision, expected in (("0001", "run: ratepay-oms db upgrade"),
                               ("9999", "does not know (a newer version upgraded it?)")):
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
        result = run("tick", "--db", url)
        assert result.code == ExitCode.DATABASE_UNAVAILABLE, result
        assert expected in one_line(result.err)
    engine.dispose()


def test_tick_loop_backs_off_then_gives_up_on_a_database_that_stays_away(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "ratepay_oms.cli", "tick", "--loop", "--interval", "0.2",
         "--max-db-outage", "1.5", "--db", f"postgresql+psycopg://postgres@127.0.0.1:{port}/x"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == ExitCode.DATABASE_UNAVAILABLE, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert any("tick retries in" in line for line in lines[:-1]), proc.stderr  # logged, waited
    assert "longer than --max-db-outage 1.5 s" in lines[-1]


# -- refusals where people look ------------------------------------------------------------


def test_a_wrong_security_code_is_visible_in_place_show_matrix_and_log(
    run, migrated: str, gateway: RunningSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, gateway, SECURITY_CODE="not-the-code")
    path, ref = order_json(tmp_path)
    placed = run("order", "place", path, "--db", migrated)
    assert placed.code == ExitCode.GATEWAY_FAILED, placed
    assert "gateway: PAYMENT_INIT refused" in placed.out
    assert "reason 120 Authentification failed" in placed.out
    assert "not-the-code" not in placed.out + placed.err

    shown = run("order", "show", ref, "--json", "--db", migrated).json()
    assert {i["state"] for i in shown["items"]} == {"payment request invalid"}
    assert all("reason 120" in i["last_error"] and "Authentification failed" in i["last_error"]
               for i in shown["items"])
    table = run("order", "show", ref, "--db", migrated)
    assert "PAYMENT_INIT refused (result 150, reason 120)" in table.out

    logged = run("log", "--order", ref, "--json", "--db", migrated).json()
    assert [c["operation"] for c in logged] == ["PAYMENT_INIT"]
    assert logged[0]["reason_code"] == "120" and logged[0]["failed"] is True

    matrix = run("matrix", "--process", "RatepayInvoice01", "--json", "--db", migrated).json()
    cells = {c["state"]: c for c in matrix["processes"][0]["states"]}
    invalid = cells["payment request invalid"]
    assert invalid["refusal"] == "invalid" and invalid["attention"] is True
    assert "(refused by the gateway" in run("matrix", "--db", migrated).out


def test_a_decline_is_labelled_and_exits_4(
    run, migrated: str, gateway: RunningSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, gateway)
    customer = json.loads(json.dumps(ORDER["customer"])) | {"last_name": "Ablehnung"}
    path, _ref = order_json(tmp_path, customer=customer)
    placed = run("order", "place", path, "--json", "--db", migrated)
    assert placed.code == ExitCode.GATEWAY_FAILED, placed
    document = placed.json()
    calls = {c["operation"]: c for c in document["gateway_calls"]}
    assert calls["PAYMENT_REQUEST"]["failed"] and calls["PAYMENT_REQUEST"]["result_code"] == 401
    assert {i["state"] for i in document["order"]["items"]} == {"payment request declined"}
    matrix = run("matrix", "--process", "RatepayInvoice01", "--json", "--db", migrated).json()
    cells = {c["state"]: c for c in matrix["processes"][0]["states"]}
    assert cells["payment request declined"]["refusal"] == "declined"


def test_an_unreachable_gateway_says_so_and_exits_4(
    run, migrated: str, gateway: RunningSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    configure(monkeypatch, gateway, API_TEST_URL=f"http://127.0.0.1:{port}/api/xml/1_0")
    path, _ref = order_json(tmp_path)
    placed = run("order", "place", path, "--db", migrated)
    assert placed.code == ExitCode.GATEWAY_FAILED, placed
    assert "gateway: PAYMENT_INIT failed" in placed.out and "connection" in placed.out
    assert "Traceback" not in placed.err


def test_place_from_stdin_and_event_as_json(
    run, migrated: str, gateway: RunningSandbox, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(monkeypatch, gateway)
    path, ref = order_json(tmp_path)
    monkeypatch.setattr(sys, "stdin", open(path, encoding="utf-8"))  # noqa: SIM115
    placed = run("order", "place", "-", "--json", "--db", migrated)
    assert placed.code == ExitCode.OK, placed
    document = placed.json()
    assert document["order"]["order_ref"] == ref
    assert [c["operation"] for c in document["gateway_calls"]] == [
        "PAYMENT_INIT", "PAYMENT_REQUEST", "PAYMENT_CONFIRM"
    ]
    assert not any(c["failed"] for c in document["gateway_calls"])

    shipped = run("event", "ship", ref, "--item", document["order"]["items"][0]["id"],
                  "--json", "--db", migrated)
    assert shipped.code == ExitCode.OK, shipped
    event = shipped.json()
    assert event["moved"][0]["from_state"] == "ready for shipment"
    assert event["gateway_calls"][0]["operation"] == "CONFIRMATION_DELIVER"
    assert event["gateway_calls"][0]["result_code"] == 404 and event["errors"] == []

    gateway.gateway.faults.add(_fault("result_code", "CONFIRMATION_DELIVER"))
    refused = run("event", "ship", ref, "--item", document["order"]["items"][1]["id"],
                  "--db", migrated)
    assert refused.code == ExitCode.GATEWAY_FAILED, refused
    assert "gateway: CONFIRMATION_DELIVER refused: result 150" in refused.out


def _fault(kind: str, operation: str) -> Any:
    from ratepay_oms.sandbox import Fault

    return Fault(kind, operation=operation, times=1)


def test_bad_order_json_on_stdin_names_line_and_column(
    run, migrated: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"order_ref": "x",\n  oops}', encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", open(broken, encoding="utf-8"))  # noqa: SIM115
    result = run("order", "place", "-", "--db", migrated)
    assert result.code == ExitCode.ERROR
    assert "<stdin>:2:" in one_line(result.err)


# -- one line for set-up mistakes -----------------------------------------------------------

_BLOCK_DRIVERS = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"psycopg", "psycopg2", "pymysql", "MySQLdb"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
    from ratepay_oms.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize(
    ("url", "extra"),
    [("postgresql+psycopg://oms@127.0.0.1/oms", "postgres"),
     ("mysql+pymysql://oms@127.0.0.1/oms", "mysql")],
)
def test_a_missing_database_driver_names_the_extra(tmp_path: Path, url: str, extra: str) -> None:
    for args in (["db", "upgrade", "--db", url], ["tick", "--db", url]):
        proc = subprocess.run(
            [sys.executable, "-c", _BLOCK_DRIVERS, *args], capture_output=True, text=True,
            timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == ExitCode.ERROR, proc.stderr
        assert f"pip install 'ratepay-oms[{extra}]'" in one_line(proc.stderr)


def test_a_sandbox_port_in_use_is_one_line(run) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("sandbox", "serve", "--port", port)
    assert result.code == ExitCode.ERROR
    assert f"port {port} on 127.0.0.1 is in use" in one_line(result.err)


@pytest.fixture
def latin1_mariadb() -> Iterator[str]:
    if "mariadb" not in os.environ.get("RATEPAY_OMS_TEST_DATABASES", "sqlite,mariadb"):
        pytest.skip("MariaDB not asked for in RATEPAY_OMS_TEST_DATABASES")
    name = f"rpoms_latin_{secrets.token_hex(3)}"
    admin = sa.create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name} CHARACTER SET latin1"))
    try:
        yield sa.engine.make_url(MARIADB_ADMIN_URL).set(database=name).render_as_string(
            hide_password=False
        )
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


def test_a_latin1_mariadb_database_is_refused_with_the_alter_to_run(
    run, latin1_mariadb: str, gateway: RunningSandbox, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = run("db", "upgrade", "--db", latin1_mariadb)
    assert refused.code == ExitCode.ERROR
    line = one_line(refused.err)
    statement = re.search(r"(ALTER DATABASE `\w+` CHARACTER SET utf8mb4 COLLATE \w+;)", line)
    assert statement, line
    engine = sa.create_engine(latin1_mariadb)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SHOW TABLES")).all() == []  # nothing created
        conn.execute(sa.text(statement.group(1)))
    engine.dispose()

    assert run("db", "upgrade", "--db", latin1_mariadb).code == ExitCode.OK
    configure(monkeypatch, gateway)
    customer = json.loads(json.dumps(ORDER["customer"])) | {"first_name": "Zoë 🐘"}
    path, ref = order_json(tmp_path, customer=customer)
    assert run("order", "place", path, "--db", latin1_mariadb).code == ExitCode.OK
    shown = run("order", "show", ref, "--json", "--db", latin1_mariadb).json()
    assert shown["data"]["customer"]["first_name"] == "Zoë 🐘"


def test_a_latin1_table_in_a_utf8mb4_database_is_refused_too(run, latin1_mariadb: str) -> None:
    engine = sa.create_engine(latin1_mariadb)
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TABLE oms_order (id INTEGER PRIMARY KEY)"))
        conn.execute(sa.text(
            "ALTER DATABASE CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ))
    engine.dispose()
    line = one_line(run("db", "upgrade", "--db", latin1_mariadb).err)
    assert "ALTER TABLE `oms_order` CONVERT TO CHARACTER SET utf8mb4" in line
    assert "ALTER DATABASE" not in line


# -- settings everywhere the same ------------------------------------------------------------


def test_engine_picks_up_ratepay_settings_from_the_environment(
    migrated: str, gateway: RunningSandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    configure(monkeypatch, gateway)
    engine = Engine(migrated)
    try:
        assert engine.services[SERVICE_NAME].settings.api_test_url == gateway.url
        data = json.loads(json.dumps(ORDER)) | {"order_ref": f"E-{secrets.token_hex(4)}"}
        view = engine.place_order(data)
        assert {i.state for i in view.items} == {"ready for shipment"}
    finally:
        engine.close()


def test_an_explicit_settings_object_wins_over_the_environment(
    migrated: str, gateway: RunningSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, gateway, SECURITY_CODE="wrong")
    settings = RatepaySettings.from_mapping(gateway.settings)
    engine = Engine(migrated, ratepay_settings=settings)
    try:
        assert engine.services[SERVICE_NAME].settings == settings
    finally:
        engine.close()
    without = Engine(migrated, definitions={})
    try:
        assert without.services[SERVICE_NAME].settings.security_code == "wrong"
    finally:
        without.close()


def test_the_config_file_sets_database_processes_plugins_and_ratepay(
    run, gateway: RunningSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = tmp_path / "shop"
    (shop / "procs").mkdir(parents=True)
    shutil.copytree(REPO / "processes", shop / "procs", dirs_exist_ok=True)
    db = f"sqlite:///{shop / 'oms.sqlite'}"
    settings = {k: v for k, v in gateway.settings.items() if k != "SECURITY_CODE"}
    ratepay = "\n".join(f'{k} = "{v}"' for k, v in settings.items())
    config = shop / "oms.toml"
    config.write_text(
        f'[oms]\ndatabase_url = "{db}"\nprocess_dir = "procs"\n'
        f'plugins = ["tests.test_cli_engine:register_failing_command"]\n\n[ratepay]\n{ratepay}\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("RATEPAY_SECURITY_CODE", gateway.settings["SECURITY_CODE"])
    monkeypatch.syspath_prepend(str(REPO))
    assert run("--config", config, "db", "upgrade").code == ExitCode.OK
    assert (shop / "oms.sqlite").exists()
    path, ref = order_json(tmp_path)
    placed = run("--config", config, "order", "place", path)
    assert placed.code == ExitCode.OK, placed
    assert "gateway: PAYMENT_REQUEST ok" in placed.out
    listed = run("--config", config, "process", "list", "--json").json()
    assert all(str(shop / "procs") in row["files"][0] for row in listed)

    monkeypatch.setenv("RATEPAY_OMS_CONFIG", str(config))  # the same through the environment
    assert ref in run("order", "list").out
    engine = Engine()  # and the Python API reads the same file
    try:
        assert engine.database_url == db
        assert engine.registry.command("CliTest/AlwaysFails") is not None
        assert engine.services[SERVICE_NAME].settings.api_test_url == gateway.url
    finally:
        engine.close()

    monkeypatch.delenv("RATEPAY_OMS_CONFIG")
    shutil.copy(config, tmp_path / "ratepay-oms.toml")  # ./ratepay-oms.toml is found alone
    (tmp_path / "procs").symlink_to(shop / "procs")
    assert ref in run("order", "list").out


def test_a_config_file_with_an_unknown_key_or_missing_file_is_one_line(
    run, tmp_path: Path
) -> None:
    config = tmp_path / "oms.toml"
    config.write_text('[oms]\ndatabase = "sqlite:///x.sqlite"\n', encoding="utf-8")
    result = run("--config", config, "order", "list")
    assert result.code == ExitCode.ERROR
    assert "unknown key(s) database in [oms]" in one_line(result.err)
    missing = run("--config", tmp_path / "nope.toml", "tick")
    assert "config file not found" in one_line(missing.err)


# -- the console's manners -------------------------------------------------------------------


def test_output_to_a_closed_pipe_exits_quietly(migrated: str, tmp_path: Path) -> None:
    script = (
        f"{sys.executable} -m ratepay_oms.cli process list | head -c 10 > /dev/null; "
        f"echo ${{PIPESTATUS[0]}}"
    )
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"},
    )
    assert proc.stdout.strip() == "0", proc.stderr
    assert proc.stderr == ""


def test_help_imports_neither_sqlalchemy_nor_the_engine(tmp_path: Path) -> None:
    code = (
        "import sys; from ratepay_oms.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('sqlalchemy', 'ratepay_oms.engine', 'ratepay_oms.sandbox', "
        "'requests', 'lxml', 'rich') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    for name in COMMANDS:
        assert f"\n  {name} " in proc.stdout


def test_every_command_is_in_the_lazy_table() -> None:
    _mount()
    assert set(cli.commands) == set(COMMANDS)


def test_log_format_json_gives_one_object_per_line(run, migrated: str) -> None:
    import logging

    before = list(logging.getLogger().handlers), logging.getLogger().level
    result = run("--log-level", "info", "--log-format", "json", "tick", "--db", migrated)
    lines = [json.loads(line) for line in result.err.splitlines()]
    assert any(line["logger"].startswith("ratepay_oms") and line["message"].startswith("tick:")
               for line in lines), result.err
    assert all(line["logger"].startswith("ratepay_oms") or line["level"] in ("warning", "error")
               for line in lines), result.err  # Alembic's info lines stay out
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    # main() leaves the host's logging as it found it
    assert (list(logging.getLogger().handlers), logging.getLogger().level) == before


# -- an installed layout, no dev dependency ---------------------------------------------------


def _installed_copy(tmp_path: Path) -> Path:
    """The package as the wheel lays it out: processes/ and migrations/ inside it."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "ratepay_oms", site / "ratepay_oms",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "processes", site / "ratepay_oms" / "processes")
    shutil.copytree(REPO / "migrations", site / "ratepay_oms" / "migrations",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return site


_BLOCK_DEV = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"pytest", "hypothesis", "_pytest"}:
                raise ModuleNotFoundError(f"No module named {name!r} (dev only)", name=name)
    sys.meta_path.insert(0, Block())
    sys.modules.pop("pytest", None)
""")


def test_an_installed_layout_finds_its_processes_and_migrations(tmp_path: Path) -> None:
    site = _installed_copy(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("RATEPAY_OMS_PROCESS_DIR", None)
    db = f"sqlite:///{elsewhere / 'oms.sqlite'}"
    code = _BLOCK_DEV + textwrap.dedent(f"""
        from ratepay_oms.cli import main
        from ratepay_oms.resources import shipped_path
        print("PROCESSES", shipped_path("processes"))
        print("MIGRATIONS", shipped_path("migrations"))
        for args in (["db", "upgrade", "--db", {db!r}], ["process", "check"],
                     ["process", "list", "--json"]):
            assert main(args) == 0, args
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180, cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"PROCESSES {site / 'ratepay_oms' / 'processes'}" in proc.stdout
    assert f"MIGRATIONS {site / 'ratepay_oms' / 'migrations'}" in proc.stdout
    assert "database at revision" in proc.stdout


def test_the_demo_and_the_sandbox_need_no_dev_dependency(tmp_path: Path) -> None:
    code = _BLOCK_DEV + textwrap.dedent("""
        import importlib, pkgutil
        import ratepay_oms
        # The pytest plugin (tests only) and `python -m ratepay_oms.cli` (it runs the command).
        skipped = {"ratepay_oms.sandbox.testing", "ratepay_oms.cli.__main__"}
        for info in pkgutil.walk_packages(ratepay_oms.__path__, "ratepay_oms."):
            if info.name not in skipped:
                importlib.import_module(info.name)
        from ratepay_oms.sandbox.running import start_sandbox
        start_sandbox().stop()
        from ratepay_oms.cli import main
        raise SystemExit(main(["demo"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "every flow ended where it should" in proc.stdout


def test_reading_commands_work_with_an_incomplete_ratepay_configuration(
    run, migrated: str, gateway: RunningSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, gateway)
    path, ref = order_json(tmp_path)
    assert run("order", "place", path, "--db", migrated).code == ExitCode.OK
    monkeypatch.delenv("RATEPAY_SECURITY_CODE")  # a shell where only the profile is exported
    for args in (("order", "show", ref), ("order", "list"), ("order", "history", ref),
                 ("intents", "list")):
        assert run(*args, "--db", migrated).code == ExitCode.OK, args
    refused = run("tick", "--db", migrated)  # a worker that would call RatePAY refuses to start
    assert refused.code == ExitCode.ERROR
    assert "SECURITY_CODE is missing" in one_line(refused.err)


def test_the_library_logs_but_configures_no_handler(tmp_path: Path) -> None:
    code = (
        "import logging, ratepay_oms\n"
        "from ratepay_oms import Engine\n"
        "print(len(logging.getLogger().handlers),"
        " [type(h).__name__ for h in logging.getLogger('ratepay_oms').handlers])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.split() == ["0", "['NullHandler']"], proc.stdout + proc.stderr
