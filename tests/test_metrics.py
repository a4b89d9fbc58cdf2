"""Prometheus metrics and tracing spans: counted on commit, read from the database at scrape
time, served over HTTP by a tick worker and by ``metrics serve``; spans when OpenTelemetry is
there, and everything still works when it is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from ratepay_oms import Engine
from ratepay_oms.cli import main
from ratepay_oms.engine.clock import wall_now
from ratepay_oms.engine.outbox import NotificationSettings
from ratepay_oms.ops import instruments, tracing
from ratepay_oms.ops.metrics import DatabaseCollector, build_registry, render
from ratepay_oms.persistence.models import Order, TransitionLog
from ratepay_oms.ratepay import RatepayFacade, RatepaySettings
from ratepay_oms.sandbox import Fault
from tests.plugins_for_tests import make_registry, order_doc, prepare_database

REPO_ROOT = Path(__file__).resolve().parents[1]

PROCESS = """
process: Metrics01
states:
  new:
  open:
  exploded:
  done:
transitions:
  - {source: new, target: open, event: start}
  - {source: open, target: exploded, event: explode}
  - {source: open, target: done, event: finish}
events:
  start: {on_enter: true}
  explode: {manual: true, command: Test/WriteThenFail}
  finish: {manual: true}
"""


@pytest.fixture(autouse=True)
def _cli_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEPAY_OMS_PLUGINS", "tests.plugins_for_tests:register")


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    d = tmp_path / "processes"
    d.mkdir()
    (d / "Metrics01.yaml").write_text(PROCESS, encoding="utf-8")
    return d


def _engine(url: str, pdir: Path) -> Engine:
    prepare_database(url)
    return Engine(url, process_dir=pdir, registry=make_registry(),
                  notifications=NotificationSettings())


def _place(engine: Engine, items: int = 2, *, fire: bool = True) -> str:
    ref = f"M-{uuid.uuid4().hex[:8]}"
    engine.place_order(order_doc(ref, process="Metrics01", lines=(("SKU", items),)), fire=fire)
    return ref


def _value(name: str, **labels: str) -> float:
    return instruments.sample(name, labels)


def test_moves_and_errors_are_counted_when_their_transaction_commits(
    fresh_db_url: str, pdir: Path
) -> None:
    engine = _engine(fresh_db_url, pdir)  # its own database: the tick sees only our orders
    moved = _value("ratepay_oms_transitions_total", process="Metrics01", event="start")
    failed = _value("ratepay_oms_transition_errors_total", process="Metrics01", event="explode")
    exploded = _value("ratepay_oms_transitions_total", process="Metrics01", event="explode")
    ticks = _value("ratepay_oms_ticks_total")
    ref = _place(engine)
    assert _value("ratepay_oms_transitions_total", process="Metrics01", event="start") \
        == moved + 2
    assert engine.trigger("explode", ref).errors
    with engine.session() as session:
        order_id = session.scalar(sa.select(Order.id).where(Order.order_ref == ref))
        error_rows = session.scalar(
            sa.select(sa.func.count()).select_from(TransitionLog)
            .where(TransitionLog.order_id == order_id, TransitionLog.is_error.is_(True))
        )
    assert error_rows and _value(
        "ratepay_oms_transition_errors_total", process="Metrics01", event="explode"
    ) == failed + error_rows
    # The failed command's transaction was rolled back: nothing moved, nothing counted.
    assert _value("ratepay_oms_transitions_total", process="Metrics01", event="explode") \
        == exploded
    engine.tick()
    assert _value("ratepay_oms_ticks_total") == ticks + 1
    assert _value("ratepay_oms_tick_duration_seconds_count") >= ticks + 1


def test_gateway_calls_are_counted_by_operation_and_result_with_their_latency(sandbox) -> None:
    facade = RatepayFacade(RatepaySettings.from_mapping({**sandbox.settings, "READ_TIMEOUT": "2"}))

    def calls(result: str) -> float:
        return _value("ratepay_oms_gateway_calls_total", operation="PAYMENT_INIT", result=result)

    before = {r: calls(r) for r in ("success", "declined", "error")}
    latency = _value("ratepay_oms_gateway_call_duration_seconds_count", operation="PAYMENT_INIT")
    assert facade.init_payment().success
    sandbox.gateway.faults.add(
        Fault("result_code", operation="PAYMENT_INIT", result_code=150, times=1)
    )
    assert not facade.init_payment().success
    sandbox.gateway.faults.add(Fault("http_500", operation="PAYMENT_INIT", times=1))
    with pytest.raises(Exception, match="HTTP status 500"):
        facade.init_payment()
    assert {r: calls(r) - before[r] for r in before} == {"success": 1, "declined": 1, "error": 1}
    assert _value("ratepay_oms_gateway_call_duration_seconds_count", operation="PAYMENT_INIT") \
        == latency + 3


def test_the_database_figures_are_read_at_scrape_time(
    fresh_db_url: str, pdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _engine(fresh_db_url, pdir)
    _place(engine, items=3)
    ref = _place(engine, items=1, fire=False)
    with engine.session() as session, session.begin():
        session.execute(sa.update(Order).where(Order.order_ref == ref).values(
            claimed_by="gone-worker", claim_expires_at=wall_now() - timedelta(minutes=5)))
    assert main(["metrics", "show", "--db", fresh_db_url, "--processes", str(pdir)]) == 0
    text = capsys.readouterr().out
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    items = "ratepay_oms_items"
    assert samples[(items, (("process", "Metrics01"), ("state", "open")))] == 3
    assert samples[(items, (("process", "Metrics01"), ("state", "new")))] == 1
    assert samples[(items, (("process", "Metrics01"), ("state", "done")))] == 0
    assert samples[("ratepay_oms_intents_open", (("status", "pending"),))] == 0
    assert samples[("ratepay_oms_leases", (("state", "expired"),))] == 1
    assert samples[("ratepay_oms_leases", (("state", "held"),))] == 0
    assert samples[("ratepay_oms_notifications", (("status", "pending"),))] == 0
    assert samples[("ratepay_oms_database_up", ())] == 1
    # A database that cannot be read: the scrape still answers, and says so.
    broken = sa.orm.sessionmaker(sa.create_engine("sqlite:////nonexistent/dir/x.sqlite"))
    registry = build_registry(broken, instruments_too=False, process=False)
    assert "ratepay_oms_database_up 0.0" in render(registry)
    assert "ratepay_oms_items" not in render(registry)
    assert isinstance(DatabaseCollector(broken).describe(), list)


def test_an_expired_lease_taken_over_is_counted(fresh_db_url: str, pdir: Path) -> None:
    engine = _engine(fresh_db_url, pdir)
    ref = _place(engine, items=1, fire=False)  # its on-enter event is due
    with engine.session() as session, session.begin():
        order = session.scalars(sa.select(Order).where(Order.order_ref == ref)).one()
        order.claimed_by, order.claim_expires_at = "dead-worker", wall_now() - timedelta(seconds=1)
    before = _value("ratepay_oms_lease_takeovers_total")
    assert engine.tick().items_moved == 1
    assert _value("ratepay_oms_lease_takeovers_total") == before + 1
    assert engine.tick().items_moved == 0
    assert _value("ratepay_oms_lease_takeovers_total") == before + 1


def test_names_follow_prometheus_conventions() -> None:
    text = render(build_registry(None, process=False))
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.name.startswith("ratepay_oms_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name


# -- served over HTTP -----------------------------------------------------------------------------

CLI = "import sys; from ratepay_oms.cli import main; sys.exit(main())"


@contextmanager
def _serving(*args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "serving metrics on http://127.0.0.1:" in line, line + proc.communicate()[1]
        yield line.split(" on ", 1)[1].strip(), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        return answer.read().decode()


def test_a_tick_worker_and_metrics_serve_answer_scrapes(
    fresh_db_url: str, pdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _engine(fresh_db_url, pdir)
    _place(engine, items=1, fire=False)
    common = ["--db", fresh_db_url, "--processes", str(pdir)]
    with _serving("tick", "--loop", "--interval", "0.2", "--metrics-port", "0", *common) as (
        worker_url, worker
    ), _serving("metrics", "serve", "--port", "0", *common) as (serve_url, server):
        deadline = time.monotonic() + 60
        while "ratepay_oms_ticks_total 0.0" in (text := _get(worker_url)):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert 'ratepay_oms_items{process="Metrics01",state="open"}' in text
        assert "ratepay_oms_tick_duration_seconds_bucket" in text
        assert "process_cpu_seconds_total" in text
        assert 'ratepay_oms_transitions_total{event="start",process="Metrics01"}' in text
        served = _get(serve_url)
        assert 'ratepay_oms_items{process="Metrics01",state="open"}' in served
        assert "ratepay_oms_ticks_total" not in served  # a worker's own counters
        port = worker_url.rsplit(":", 1)[1].split("/")[0]
        # The port is taken: one line, exit 2 (in-process: it fails before serving anything).
        assert main(["metrics", "serve", "--port", port, *common]) == 2
        assert "cannot serve metrics" in capsys.readouterr().err
    assert worker.returncode == 0 and server.returncode == 0


def test_metrics_port_without_loop_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tick", "--metrics-port", "9464"]) == 2
    assert "--metrics-port only makes sense with --loop" in capsys.readouterr().err


# -- tracing -------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for the ``opentelemetry.trace`` module: records the spans started."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, dict[str, Any]]] = []

    def get_tracer(self, name: str) -> _Recorder:
        return self

    @contextmanager
    def start_as_current_span(self, name: str, attributes: dict[str, Any]) -> Iterator[Any]:
        self.spans.append((name, attributes))
        yield self

    def set_attribute(self, key: str, value: Any) -> None:
        self.spans[-1][1][key] = value


def test_spans_wrap_ticks_and_gateway_calls(
    monkeypatch: pytest.MonkeyPatch, tmp_sqlite_url: str, pdir: Path, sandbox
) -> None:
    import opentelemetry.trace  # the extra is installed for the tests

    assert tracing.enabled()
    with tracing.span("real-api-no-sdk") as current:
        assert isinstance(current, opentelemetry.trace.Span)
    recorder = _Recorder()
    monkeypatch.setattr(tracing, "_trace", recorder)
    engine = _engine(tmp_sqlite_url, pdir)
    engine.tick()
    RatepayFacade(RatepaySettings.from_mapping(sandbox.settings)).init_payment()
    names = [name for name, _ in recorder.spans]
    assert "ratepay_oms.tick" in names and "ratepay PAYMENT_INIT" in names
    tick_attrs = dict(recorder.spans[names.index("ratepay_oms.tick")][1])
    assert tick_attrs["ratepay_oms.items_moved"] == 0


def test_spans_go_to_a_tracer_provider_set_after_the_first_span() -> None:
    """Without an SDK a span is the current (non-recording) one; once the host application
    sets a tracer provider, spans start through it, the exception in one included."""
    script = (
        "from opentelemetry import trace\n"
        "from ratepay_oms.ops import tracing\n"
        "started = []\n"
        "class Tracer(trace.NoOpTracer):\n"
        "    def start_span(self, name, *args, **kwargs):\n"
        "        started.append(name)\n"
        "        return trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)\n"
        "class Provider(trace.TracerProvider):\n"
        "    def get_tracer(self, *args, **kwargs):\n"
        "        return Tracer()\n"
        "with tracing.span('before') as outer:\n"
        "    with tracing.span('nested') as inner:\n"
        "        assert inner is outer is trace.get_current_span()\n"
        "assert outer is trace.INVALID_SPAN\n"
        "trace.set_tracer_provider(Provider())\n"
        "with tracing.span('after', {'a': 1}):\n"
        "    pass\n"
        "try:\n"
        "    with tracing.span('failing'):\n"
        "        raise KeyError('x')\n"
        "except KeyError:\n"
        "    pass\n"
        "assert started == ['after', 'failing'], started\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_spans_ask_for_the_tracer_once_and_pass_exceptions_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``span`` keeps the tracer of the ``trace`` module it got it from (one lookup of the
    provider, not one per gateway call) and takes a new one when the module is replaced."""
    asked: list[str] = []

    class _Counting(_Recorder):
        def get_tracer(self, name: str) -> _Recorder:
            asked.append(name)
            return self

    first, second = _Counting(), _Counting()
    monkeypatch.setattr(tracing, "_trace", first)
    for n in range(3):
        with tracing.span(f"s{n}", {"n": n}) as current:
            assert current is first
    with pytest.raises(KeyError, match="boom"), tracing.span("failing"):
        raise KeyError("boom")
    assert asked == [tracing.TRACER_NAME]
    assert [name for name, _ in first.spans] == ["s0", "s1", "s2", "failing"]
    monkeypatch.setattr(tracing, "_trace", second)
    with tracing.span("other"):
        pass
    assert asked == [tracing.TRACER_NAME] * 2 and [n for n, _ in second.spans] == ["other"]


def test_everything_works_without_opentelemetry(tmp_sqlite_url: str, pdir: Path) -> None:
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from ratepay_oms.ops import tracing\n"
        "assert not tracing.enabled()\n"
        "from ratepay_oms.cli import main\n"
        "sys.exit(main(['tick', '--db', sys.argv[1], '--processes', sys.argv[2]]))\n"
    )
    prepare_database(tmp_sqlite_url)
    done = subprocess.run(
        [sys.executable, "-c", script, tmp_sqlite_url, str(pdir)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "tick: 0 items moved" in done.stdout
