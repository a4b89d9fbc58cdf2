"""The RatePAY security code goes into the request body to the gateway and nowhere else; the
OAuth client secret of the Transaction Status API goes into the token request and nowhere else.

One whole workflow through the console (``ratepay_oms.cli``'s ``cli`` group under click's
``CliRunner``) against a sandbox that accepts only a distinctive generated code: place two
orders from ``tests/data/order-invoice.json``, ship (HTTP 500 first, then the tick's retry),
refund (a refused return, then ``retry refund``), a payment request answered with broken XML
(the tick retries it), cancel, and a settings error. Everything a person or a log shipper could
see is collected — every CLI output (stdout and stderr, ``--json`` included), every logging
record at DEBUG, every exception with its chain, every column of every row of every table — and
searched for the code, whole or in part (a Rich table may fold a long value over two lines).

The sandbox checks the code on every call, so items that moved prove it was sent.
"""

from __future__ import annotations

import json
import logging
import secrets
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ratepay_oms import Engine
from ratepay_oms.cli import _mount, cli
from ratepay_oms.errors import ExitCode
from ratepay_oms.persistence.models import Intent
from ratepay_oms.plugins.ratepay import services as ratepay_services
from ratepay_oms.ratepay import RatepayFacade, RatepaySettings
from ratepay_oms.ratepay.errors import RatepaySettingsError
from ratepay_oms.sandbox.faults import Fault
from ratepay_oms.sandbox.gateway import SandboxConfig
from ratepay_oms.sandbox.status_api import OAuthConfig
from ratepay_oms.sandbox.testing import RunningSandbox, start_sandbox

REPO = Path(__file__).resolve().parents[1]
PROCESSES = REPO / "processes"
EXAMPLE = Path(__file__).parent / "data" / "order-invoice.json"

CREDENTIAL_REFUSED = "120"
"""RatePAY's reason code for a wrong profile id / security code."""

FRAGMENT = 12
"""Length of the pieces of the code searched for: a fold in a table cell leaves one side of at
least half the code (31 characters), and 12 random-looking characters never match by chance."""


def fragments(secret: str) -> set[str]:
    return {secret[i : i + FRAGMENT] for i in range(len(secret) - FRAGMENT + 1)}


class Haystack:
    """Every text a user, an operator or a log collector could see, labelled by where it came
    from; ``leaks()`` names the ones that hold the secret or a piece of it."""

    def __init__(self, *secrets: str) -> None:
        self.pieces = set().union(*(fragments(secret) for secret in secrets))
        self.texts: list[tuple[str, str]] = []

    def add(self, label: str, text: object) -> None:
        self.texts.append((label, text if isinstance(text, str) else repr(text)))

    def leaks(self) -> list[str]:
        found = []
        for label, text in self.texts:
            for piece in self.pieces:
                at = text.find(piece)
                if at >= 0:
                    found.append(f"{label}: …{text[max(0, at - 60) : at + 60]!r}…")
                    break
        return found

    def __len__(self) -> int:
        return sum(len(text) for _, text in self.texts)


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    def json(self) -> Any:
        return json.loads(self.stdout)


def _exception_text(exc: BaseException) -> str:
    """Message, type and traceback of ``exc`` and of every exception chained to it."""
    return "".join(traceback.format_exception(exc)) + "\n" + repr(exc)


@pytest.fixture
def secret() -> str:
    return f"S3cr3t-{secrets.token_hex(12)}"


@pytest.fixture
def oauth_secret() -> str:
    return f"OAuth-{secrets.token_hex(12)}"


@pytest.fixture
def sandbox_with_secret(secret: str, oauth_secret: str) -> Iterator[RunningSandbox]:
    running = start_sandbox(
        SandboxConfig(seed=1, security_code=secret, oauth=OAuthConfig(client_secret=oauth_secret))
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def cli_engines(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Engine]]:
    """The engines the console builds (one per command), so their API log writer threads can
    be flushed before the log is read, and everything closed after the command, as process
    exit would."""
    built: list[Engine] = []
    attach = ratepay_services.attach_configured_ratepay

    def tracking(engine: Engine, environ: Any = None) -> bool:
        built.append(engine)
        return attach(engine, environ)

    monkeypatch.setattr(ratepay_services, "attach_configured_ratepay", tracking)
    yield built
    _close(built)


def _close(engines: list[Engine]) -> None:
    while engines:
        engines.pop().close()


def _order_file(tmp_path: Path, ref: str) -> Path:
    data = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    data["order_ref"] = ref
    path = tmp_path / f"{ref}.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _dump_database(url: str, hay: Haystack) -> int:
    """Every column of every row of every table (reflected, so tables added later are read
    too) into ``hay``; returns the number of rows read."""
    db = sa.create_engine(url)
    rows = 0
    try:
        metadata = sa.MetaData()
        metadata.reflect(db)
        with db.connect() as conn:
            for table in metadata.sorted_tables:
                for row in conn.execute(sa.select(table)):
                    rows += 1
                    for column, value in row._mapping.items():
                        if isinstance(value, bytes | bytearray | memoryview):
                            value = bytes(value).decode("utf-8", "replace")
                        hay.add(f"db {table.name}.{column}", "" if value is None else str(value))
    finally:
        db.dispose()
    return rows


def _collect_logs(caplog: pytest.LogCaptureFixture, hay: Haystack) -> None:
    hay.add("logging (formatted)", caplog.text)
    for record in caplog.records:
        hay.add(f"log {record.name}", record.getMessage())
        hay.add(f"log {record.name} (record)", vars(record))
        if record.exc_info and record.exc_info[1] is not None:
            hay.add(f"log {record.name} (exception)", _exception_text(record.exc_info[1]))


def test_the_leak_check_finds_the_secret_whole_folded_and_in_a_database_row(
    secret: str, tmp_sqlite_url: str
) -> None:
    hay = Haystack(secret)
    hay.add("clean", "security code ******** masked")
    assert hay.leaks() == []
    hay.add("folded", f"│ {secret[:16]} │\n│ {secret[16:]} │")
    assert [leak.split(":")[0] for leak in hay.leaks()] == ["folded"]

    db = sa.create_engine(tmp_sqlite_url)
    with db.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (note TEXT, blob BLOB)"))
        conn.execute(sa.text("INSERT INTO t VALUES ('x', :b)"), {"b": f"<{secret}>".encode()})
    db.dispose()
    hay = Haystack(secret)
    assert _dump_database(tmp_sqlite_url, hay) == 1
    assert [leak.split(":")[0] for leak in hay.leaks()] == ["db t.blob"]


def test_the_security_code_appears_in_no_output_log_error_or_table(
    fresh_db_url: str,
    secret: str,
    oauth_secret: str,
    sandbox_with_secret: RunningSandbox,
    cli_engines: list[Engine],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("RATEPAY_OMS_DATABASE_URL", "RATEPAY_OMS_PLUGINS", "RATEPAY_OMS_PROCESS_DIR"):
        monkeypatch.delenv(name, raising=False)
    sandbox = sandbox_with_secret
    gateway = sandbox.gateway
    assert sandbox.settings["SECURITY_CODE"] == secret
    assert sandbox.settings["OAUTH_CLIENT_SECRET"] == oauth_secret
    env = {f"RATEPAY_{key}": value for key, value in sandbox.settings.items()}
    env["COLUMNS"] = "200"
    hay = Haystack(secret, oauth_secret)
    url = fresh_db_url
    _mount()  # attach the command groups to ``cli`` (what ``main`` does first)
    runner = CliRunner()

    def run(*args: str, engine: bool = True, extra_env: dict[str, str] | None = None) -> CliRun:
        argv = [*args, "--db", url] + (["--processes", str(PROCESSES)] if engine else [])
        result = runner.invoke(cli, argv, env={**env, **(extra_env or {})})
        _close(cli_engines)  # the API log is written before anything reads it
        label = "$ ratepay-oms " + " ".join(args)
        hay.add(f"{label} (stdout)", result.stdout)
        hay.add(f"{label} (stderr)", result.stderr)
        exc = result.exception
        if exc is not None and not isinstance(exc, SystemExit):
            hay.add(f"{label} (exception)", _exception_text(exc))
        return CliRun(result.exit_code, result.stdout, result.stderr, exc)

    def states(ref: str) -> list[str]:
        return [item.state for item in reader.order(ref).items]

    def later(minutes: int) -> str:
        return (datetime.now(UTC) + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")

    assert run("db", "upgrade", engine=False).code == 0
    reader = Engine(url, process_dir=PROCESSES)  # to check states without a command per look
    shipped, cancelled = f"S-{secrets.token_hex(4)}", f"C-{secrets.token_hex(4)}"

    # Order 1: paid, shipped (HTTP 500, then the tick's retry), one item refunded after a
    # refused return, the rest waiting for returns.
    placed = run("order", "place", str(_order_file(tmp_path, shipped)))
    assert placed.code == 0, placed.stderr
    assert states(shipped) == ["ready for shipment"] * 4  # the sandbox took the code
    gateway.add_fault(Fault("http_500", operation="CONFIRMATION_DELIVER", times=1))
    ship = run("event", "ship", shipped)
    assert ship.code != 0 and shipped in str(ship.exception)  # the tick takes it from here
    assert states(shipped) == ["shipped"] * 4
    tick = run("tick", "--json", "--now", later(60))
    # The lost answer is reconciled as not booked (counted as the tick's error) and re-sent.
    assert tick.code == ExitCode.GATEWAY_FAILED, tick.stderr
    assert tick.json()["items_moved"] >= 4
    assert states(shipped) == ["ready for refund"] * 4
    item_id = str(reader.order(shipped).items[0].id)
    gateway.add_fault(
        Fault("result_code", operation="PAYMENT_CHANGE", subtype="return", times=1,
              reason_code=2300)
    )
    refused = run("event", "refund payment", shipped, "--item", item_id)
    assert refused.code == ExitCode.GATEWAY_FAILED  # done, but the gateway refused the call
    assert states(shipped)[0] == "refund invalid"
    assert run("event", "retry refund", shipped, "--item", item_id).code == 0
    assert states(shipped) == ["completed"] + ["ready for refund"] * 3

    # Order 2: the payment request's answer is broken XML, the tick retries, then cancelled.
    gateway.add_fault(Fault("malformed_xml", operation="PAYMENT_REQUEST", times=1))
    run("order", "place", str(_order_file(tmp_path, cancelled)))
    assert states(cancelled) == ["payment request initialized"] * 4
    tick = run("tick", "--json", "--now", later(120))
    assert tick.code == 0, tick.stdout
    assert states(cancelled) == ["ready for shipment"] * 4
    assert run("event", "cancel", cancelled).code == 0
    assert states(cancelled) == ["cancelled"] * 4

    # Order 3: the delivery's answer is lost after booking; the tick reconciles it through the
    # status API (OAuth token with the client secret), first with a wrong secret (refused, the
    # intent waits), then with the right one.
    lost = f"L-{secrets.token_hex(4)}"
    assert run("order", "place", str(_order_file(tmp_path, lost))).code == 0
    gateway.add_fault(Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER", times=1))
    assert run("event", "ship", lost).code != 0
    wrong_secret = {"RATEPAY_OAUTH_CLIENT_SECRET": oauth_secret[::-1]}

    def reconcile_due() -> None:  # the intent's lease and backoff run on the wall clock
        db = sa.create_engine(url)
        with db.begin() as conn:
            conn.execute(sa.update(Intent).values(reconcile_at=datetime(2000, 1, 1)))
        db.dispose()

    reconcile_due()
    refused_tick = run("tick", "--json", "--now", later(180), extra_env=wrong_secret)
    assert "OAUTH_CLIENT_SECRET" in refused_tick.stdout + refused_tick.stderr
    assert states(lost) == ["shipped"] * 4
    assert run("intents", "list", engine=False).code == 0
    assert run("order", "show", lost).code == 0
    reconcile_due()
    assert run("tick", "--json", "--now", later(240)).code == 0
    assert states(lost) == ["ready for refund"] * 4
    assert gateway.oauth.issued >= 1

    # Settings errors: the console refuses to start, and says which key is wrong.
    for key, bad in (("MODE", "sometimes"), ("CONNECT_TIMEOUT", "soon"), ("API_TEST_URL", "x")):
        refused = run("tick", extra_env={f"RATEPAY_{key}": bad})
        assert isinstance(refused.exception, RatepaySettingsError), refused
        assert key in str(refused.exception)

    # The gateway booked what it was sent (so the code was right) and saw each fault.
    received = gateway.received
    assert {ex.fault for ex in received} == {
        None, "http_500", "result_code", "malformed_xml", "timeout_after_booking"
    }
    assert sum(ex.booked for ex in received) >= 5

    # Everything a person could look at afterwards.
    for ref in (shipped, cancelled):
        assert run("order", "show", ref).code == 0
        assert run("order", "show", ref, "--json").json()["order_ref"] == ref
    assert run("order", "history", shipped).code == 0
    assert run("order", "history", shipped, "--json").code == 0
    assert run("order", "list", "--json").code == 0
    assert run("matrix").code == 0
    assert run("matrix", "--json").code == 0
    for args in (("log",), ("log", "--json"), ("log", "--xml"), ("log", "--json", "--xml"),
                 ("log", "--errors")):
        assert run(*args, engine=False).code == 0
    api_calls = run("log", "--json", "--xml", "--limit", "200", engine=False).json()
    xml_calls = [
        c for c in api_calls if c["operation"] not in ("TRANSACTION_STATUS", "OAUTH_TOKEN")
    ]
    assert {"TRANSACTION_STATUS", "OAUTH_TOKEN"} <= {c["operation"] for c in api_calls}
    assert len(xml_calls) == len(received)  # every XML call (faults included) is in the log
    assert all("securitycode" in (call["request_xml"] or "") for call in xml_calls)
    assert CREDENTIAL_REFUSED not in {call["reason_code"] for call in api_calls}
    assert run("locks", "list", "--json", engine=False).code == 0

    # The objects a developer prints; and the gateway does check the code.
    settings = RatepaySettings.from_mapping(sandbox.settings)
    facade = RatepayFacade(settings)
    wrong_code = {**sandbox.settings, "SECURITY_CODE": "x" * 8}
    wrong = RatepayFacade(RatepaySettings.from_mapping(wrong_code))
    refusal = wrong.init_payment()
    assert not refusal.success and str(refusal.reason_code) == CREDENTIAL_REFUSED
    for obj in (settings, facade, gateway.config):
        hay.add(f"repr {type(obj).__name__}", repr(obj))
        hay.add(f"str {type(obj).__name__}", str(obj))
    for values in (
        {**sandbox.settings, "MODE": "never"},
        {**sandbox.settings, "SECURTY_CODE": secret},  # a typo in the key
        {"SECURITY_CODE": secret},  # no PROFILE_ID
        {**sandbox.settings, "SECURITY_CODE": [secret]},  # not a string
        {**sandbox.settings, "OAUTH_CLIENT_SECRET": [oauth_secret]},  # not a string
        {**sandbox.settings, "OAUTH_CLIENT_ID": ""},  # a secret without its client
        {**sandbox.settings, "OAUTH_TOKEN_URL": oauth_secret},  # pasted in the wrong key
    ):
        with pytest.raises(RatepaySettingsError) as refused:
            RatepaySettings.from_mapping(values)
        hay.add("settings error", _exception_text(refused.value))
    bad_toml = tmp_path / "ratepay.toml"
    bad_toml.write_text(f'[ratepay]\nPROFILE_ID = "x"\nSECURITY_CODE = "{secret}\n')
    with pytest.raises(RatepaySettingsError) as refused:
        RatepaySettings.from_toml(bad_toml)
    hay.add("settings error (toml)", _exception_text(refused.value))

    reader.close()
    rows = _dump_database(url, hay)
    _collect_logs(caplog, hay)
    assert rows > 20 and len(caplog.records) > 20 and len(hay) > 20_000  # we did look
    assert hay.leaks() == []

