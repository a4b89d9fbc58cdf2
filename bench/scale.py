"""Scale: how tick workers and gateway concurrency turn into orders per second.

Not a test: it prints one table, measured in the same run, and asserts nothing. For every
configuration it

1. creates a throw-away PostgreSQL database (``--admin-url``) and migrates it;
2. starts W ``ratepay-oms tick --loop`` workers (``--concurrency K`` when K > 1), waits until
   each has finished an idle tick, and stops them with SIGSTOP;
3. places ``--orders`` invoice orders with ``fire=False`` (so the workers do all the work);
4. lets the workers go (SIGCONT) and times until every item is at rest (no on-enter or
   event-less work left, no open intent, no retry), polling the database;

against one sandbox gateway process (``ratepay-oms sandbox serve``) that answers every XML call
after ``--delay-ms`` (a ``delay`` fault on every operation). The baseline is one serial worker
(W=1, K=1), the strongest configuration the engine had before ``--concurrency``; the table gives
orders/s and the speed-up over it for W = 1, 2, 4, 8 workers at concurrency 1 and for one
worker at K = 1, 4, 16.

Last, the engine's CPU per order: one worker, no gateway delay, ``--cpu-orders`` orders from
``new`` to ``ready for shipment``; the worker process's user+system CPU time (from
``/proc/<pid>/stat``) while it works, divided by the orders, the median of ``--cpu-runs``
runs. The sandbox runs in its own process, so its CPU is not counted. ``--cpu-only``
measures only that (about a minute).

    python3 bench/scale.py
    python3 bench/scale.py --cpu-only
    python3 bench/scale.py --orders 100 --delay-ms 50 --workers 1,8 --concurrency 16
    python3 bench/scale.py --cpu-only --profile /tmp/worker.prof   # cProfile of that worker

One more run of the same orders, after the CPU runs, counts the SQL statements and commits
per order the worker sent (a SQLAlchemy ``before_cursor_execute`` / ``commit`` listener in
the worker; it costs about a tenth of the worker's CPU, which is why the CPU runs go without
it) and takes the ``--profile``; ``--statements`` lists the most frequent statements.

A checkout whose ``tick`` has no ``--concurrency`` (the engine before it) gets ``n/a`` for
K > 1, so the same script measures the before figures.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import sqlalchemy as sa

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from soak import (  # noqa: E402  (bench/ is not a package; soak.py owns these helpers)
    DEFAULT_ADMIN_URL,
    ORDER_TEMPLATE,
    PROCESS_DIR,
    PROFILE_ID,
    SandboxProcess,
    child_env,
    cli_command,
    soak_database,
    spawn,
)

from ratepay_oms.engine.engine import Engine  # noqa: E402
from ratepay_oms.persistence.db import upgrade  # noqa: E402
from ratepay_oms.persistence.models import OrderItem  # noqa: E402

SECURITY_CODE = "bench-" + secrets.token_hex(8)
PROCESS = "RatepayInvoice01"
REST = "ready for shipment"


@dataclass(frozen=True)
class Result:
    workers: int
    concurrency: int
    orders: int
    seconds: float | None
    cpu_ms_per_order: float | None = None
    statements: dict[str, int] | None = None
    commits: int | None = None
    warmup_ms_per_order: float | None = None

    @property
    def rate(self) -> float | None:
        return None if self.seconds is None else self.orders / self.seconds


@functools.cache
def supports_concurrency() -> bool:
    done = subprocess.run(
        [*cli_command(), "tick", "--help"], env=child_env({}), capture_output=True, text=True
    )
    return "--concurrency" in done.stdout


def order_docs(count: int, tag: str) -> Iterator[dict[str, Any]]:
    base = json.loads(ORDER_TEMPLATE.read_text(encoding="utf-8"))
    for n in range(count):
        doc = copy.deepcopy(base)
        doc["order_ref"] = f"scale-{tag}-{n:05d}"
        doc["process"] = PROCESS
        yield doc


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


WORKER_BOOT = """
import json, os, signal, sys
from collections import Counter
import sqlalchemy as sa
from ratepay_oms.cli import main

counts = Counter()
commits = [0]
out = os.environ.get("RPOMS_SCALE_STATS")
prof = os.environ.get("RPOMS_SCALE_PROFILE")
profiler = None
if prof:
    import cProfile
    import time
    profiler = cProfile.Profile(time.thread_time)  # CPU of the main thread, not wall time
if out:
    def _count(conn, cursor, statement, parameters, context, executemany):
        counts[" ".join(statement.split())[:int(os.environ.get("RPOMS_SCALE_WIDTH", "100"))]] += 1
    def _commit(conn):
        commits[0] += 1
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", _count)
    sa.event.listen(sa.engine.Engine, "commit", _commit)
def _start(signum, frame):
    counts.clear()
    commits[0] = 0
    if profiler is not None:
        profiler.enable()
def _stop(signum, frame):
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(prof)
    if out:
        with open(out + ".tmp", "w") as f:
            json.dump({"statements": counts, "commits": commits[0]}, f)
        os.replace(out + ".tmp", out)
signal.signal(signal.SIGUSR1, _start)
signal.signal(signal.SIGUSR2, _stop)
sys.argv[0] = "ratepay-oms"
sys.exit(main())
"""
"""The worker, in the bench's interpreter: ``ratepay-oms`` plus, when asked through the
environment, a count of its SQL statements and commits (``RPOMS_SCALE_STATS``) and a cProfile
(``RPOMS_SCALE_PROFILE``), both from SIGUSR1 (the orders are placed) to SIGUSR2 (every item
rests), written at SIGUSR2."""


class Workers:
    def __init__(self, url: str, sandbox: SandboxProcess, count: int, concurrency: int,
                 log_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        env = child_env({
            "RATEPAY_OMS_DATABASE_URL": url,
            "RATEPAY_OMS_PROCESS_DIR": str(PROCESS_DIR),
            "RATEPAY_PROFILE_ID": PROFILE_ID,
            "RATEPAY_SECURITY_CODE": SECURITY_CODE,
            "RATEPAY_MODE": "test",
            "RATEPAY_API_TEST_URL": sandbox.url,
            "RATEPAY_STATUS_API_URL": sandbox.status_url,
            **(extra_env or {}),
        })
        command = [sys.executable, "-c", WORKER_BOOT,
                   "tick", "--loop", "--interval", "0.05", "--json"]
        if concurrency > 1 or supports_concurrency():
            # Always said: the command's default is not 1 (``DEFAULT_CONCURRENCY``), so a
            # worker started without it is no serial worker.
            command += ["--concurrency", str(concurrency)]
        for slot in range(count):
            path = log_dir / f"worker-{count}x{concurrency}-{slot}.log"
            self.logs.append(path)
            with path.open("wb") as out:
                self.procs.append(spawn(command, env, out, subprocess.STDOUT))

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every worker has printed one tick result (imports done, connected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all('"items_moved"' in p.read_text(errors="replace") for p in self.logs):
                return
            for proc, path in zip(self.procs, self.logs, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited at start:\n{path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("workers did not start in time")

    def signal(self, sig: int) -> None:
        for proc in self.procs:
            proc.send_signal(sig)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def not_at_rest(db: sa.Engine, busy_states: Sequence[str]) -> int:
    with db.connect() as conn:
        return int(conn.execute(
            sa.select(sa.func.count()).select_from(OrderItem).where(
                sa.or_(
                    OrderItem.state.in_(list(busy_states)),
                    OrderItem.intent_id.is_not(None),
                    OrderItem.retry_at.is_not(None),
                )
            )
        ).scalar_one())


def busy_states(engine: Engine) -> list[str]:
    """States the tick still has work in: an on-enter event or event-less transitions."""
    definition = engine.definitions()[PROCESS]
    return sorted(
        s for s in definition.states
        if definition.on_enter_event(s) is not None or definition.has_eventless(s)
    )


def measure(admin_url: str, sandbox: SandboxProcess, workers: int, concurrency: int,
            orders: int, log_dir: Path, deadline: float, *, count: bool = False,
            profile: str | None = None, spy: str | None = None, warmup: int = 0) -> Result:
    """One configuration; ``count``: the worker counts its statements and commits (those it
    sent while idle before the orders were placed are subtracted), ``profile``: cProfile of
    the worker written there; ``warmup``: orders the workers work first, not measured."""
    extra: dict[str, str] = {}
    stats_path = log_dir / f"stats-{workers}x{concurrency}.json"
    if count:
        extra["RPOMS_SCALE_STATS"] = str(stats_path)
    if profile:
        extra["RPOMS_SCALE_PROFILE"] = str(Path(profile).resolve())
        Path(profile).unlink(missing_ok=True)
    with soak_database(None, admin_url, keep=False) as (url, _):
        upgrade(url)
        engine = Engine(url, process_dir=PROCESS_DIR, services={})
        busy = busy_states(engine)
        pool = Workers(url, sandbox, workers, concurrency, log_dir, extra)
        try:
            pool.wait_ready()
            warm_ms = warm_up(engine, pool, busy, warmup, deadline) if warmup else None
            spying = start_spy(pool.procs[0].pid, spy) if spy else None
            pool.signal(signal.SIGSTOP)
            tag = f"{workers}x{concurrency}-{secrets.token_hex(2)}"
            for doc in order_docs(orders, tag):
                engine.place_order(doc, fire=False)
            cpu_before = sum(cpu_seconds(p.pid) for p in pool.procs)
            started = time.perf_counter()
            if extra:
                pool.signal(signal.SIGUSR1)
            pool.signal(signal.SIGCONT)
            seconds: float | None = None
            while time.perf_counter() - started < deadline:
                if not_at_rest(engine.db, busy) == 0:
                    seconds = time.perf_counter() - started
                    break
                time.sleep(0.05)
            cpu = sum(cpu_seconds(p.pid) for p in pool.procs) - cpu_before
            if spying is not None:
                spying.send_signal(signal.SIGINT)
                spying.wait(timeout=60)
            if extra:
                pool.signal(signal.SIGUSR2)
                wait_for = stats_path if count else Path(extra["RPOMS_SCALE_PROFILE"])
                until = time.monotonic() + 30
                while not wait_for.exists() and time.monotonic() < until:
                    time.sleep(0.05)
            with engine.db.connect() as conn:
                resting = conn.execute(
                    sa.select(sa.func.count()).select_from(OrderItem)
                    .where(OrderItem.state == REST)
                ).scalar_one()
                total = conn.execute(
                    sa.select(sa.func.count()).select_from(OrderItem)
                ).scalar_one()
            if resting != total:
                print(f"  note: {total - resting} of {total} items not in {REST!r}",
                      file=sys.stderr)
        finally:
            pool.stop()
            engine.close()
        statements: dict[str, int] | None = None
        commits: int | None = None
        if count and stats_path.exists():
            found = json.loads(stats_path.read_text())
            statements, commits = found["statements"], found["commits"]
        return Result(workers, concurrency, orders, seconds, cpu * 1000 / orders,
                      statements, commits, warm_ms)


def warm_up(engine: Engine, pool: Workers, busy: Sequence[str], orders: int,
            deadline: float) -> float:
    """Let the workers work ``orders`` orders first; their CPU per order (ms). A worker's
    first orders pay what it pays once per process: SQLAlchemy compiling each statement and
    ORM query the first time, the payment profiles' first read, the first connections. A
    shop's worker runs for hours, so the CPU per order measured after this is what each
    further order costs; the warm-up's own figure is printed beside it."""
    before = sum(cpu_seconds(p.pid) for p in pool.procs)
    for doc in order_docs(orders, f"warm-{secrets.token_hex(2)}"):
        engine.place_order(doc, fire=False)
    started = time.perf_counter()
    while not_at_rest(engine.db, busy):
        if time.perf_counter() - started > deadline:
            raise RuntimeError("the warm-up orders did not come to rest in time")
        time.sleep(0.05)
    return (sum(cpu_seconds(p.pid) for p in pool.procs) - before) * 1000 / orders


def start_spy(pid: int, path: str) -> subprocess.Popen[bytes]:
    """py-spy (``pip install py-spy``) on the worker, sampling only while it holds the GIL: its
    Python CPU, not its waits on the database, as collapsed stacks (``--format raw``)."""
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--gil", "--rate", "400", "--format", "raw",
         "--output", path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches before the worker is let go
    return spy


def set_delay(sandbox: SandboxProcess, delay_ms: float) -> None:
    sandbox.http.delete(sandbox.faults_url, timeout=10).raise_for_status()
    if delay_ms > 0:
        sandbox.add_faults([{"kind": "delay", "probability": 1.0, "delay_s": delay_ms / 1000}])


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--cpu-orders", type=int, default=100)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts at concurrency 1")
    parser.add_argument("--concurrency", default="1,4,16", help="K values for one worker")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL)
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--cpu-runs", type=int, default=3,
                        help="CPU runs; the median is printed")
    parser.add_argument("--cpu-warmup", type=int, default=20, metavar="N",
                        help="orders each CPU run's worker works first, not measured "
                             "(its once-per-process costs); 0: none")
    parser.add_argument("--cpu-only", action="store_true",
                        help="only the engine CPU per order (same as --workers= --concurrency=)")
    parser.add_argument("--profile", metavar="PATH",
                        help="write a cProfile of the counted run's worker to PATH (pstats)")
    parser.add_argument("--spy", metavar="PATH",
                        help="py-spy the counted run's worker (GIL samples, collapsed stacks)")
    parser.add_argument("--statements", type=int, default=0, metavar="N",
                        help="list the N most frequent SQL statements of the CPU run")
    args = parser.parse_args(argv)
    if args.spy and shutil.which("py-spy") is None:
        parser.error("--spy needs py-spy on PATH: pip install py-spy")
    worker_counts = [int(x) for x in args.workers.split(",") if x and not args.cpu_only]
    ks = [int(x) for x in args.concurrency.split(",") if x and not args.cpu_only]
    has_k = supports_concurrency()

    print(f"scale: {args.orders} {PROCESS} orders, gateway delay {args.delay_ms:g} ms, "
          f"PostgreSQL, {os.cpu_count()} cores, load {load()}")
    results: dict[tuple[int, int], Result] = {}
    with TemporaryDirectory(prefix="rpoms-scale-") as tmp:
        log_dir = Path(tmp)
        sandbox = SandboxProcess(log_dir / "sandbox.log", seed=1, fault_delay=0.0,
                                 security_code=SECURITY_CODE)
        sandbox.start()
        try:
            set_delay(sandbox, args.delay_ms)
            configs = [(w, 1) for w in worker_counts] + [(1, k) for k in ks]
            for w, k in dict.fromkeys(configs):
                if k > 1 and not has_k:
                    results[(w, k)] = Result(w, k, args.orders, None)
                    continue
                r = measure(args.admin_url, sandbox, w, k, args.orders, log_dir, args.deadline)
                results[(w, k)] = r
                rate = "timeout" if r.rate is None else f"{r.rate:.1f} orders/s"
                print(f"  W={w} K={k}: {rate} (load {load()})", file=sys.stderr)
            set_delay(sandbox, 0)
            # The CPU runs carry no instrumentation (the statement counter's listener alone
            # cost about a tenth of the worker's CPU); the statements are counted, and a
            # profile taken, in a run of their own after them.
            cpu_runs = [
                measure(args.admin_url, sandbox, 1, 1, args.cpu_orders, log_dir, args.deadline,
                        warmup=args.cpu_warmup)
                for _ in range(max(1, args.cpu_runs))
            ]
            counted = measure(args.admin_url, sandbox, 1, 1, args.cpu_orders, log_dir,
                              args.deadline, count=True, profile=args.profile,
                              spy=args.spy, warmup=args.cpu_warmup)
        finally:
            sandbox.stop()

    base = results.get((1, 1))
    base_rate = base.rate if base is not None else None
    print()
    if results:
        print(f"{'workers':>7} {'concurrency':>11} {'orders/s':>9} {'speed-up':>9}")
    for (w, k), r in results.items():
        rate = "n/a" if r.rate is None else f"{r.rate:.1f}"
        up = "n/a" if r.rate is None or not base_rate else f"{r.rate / base_rate:.2f}x"
        print(f"{w:>7} {k:>11} {rate:>9} {up:>9}")
    cpu = sorted(cpu_runs, key=lambda r: r.cpu_ms_per_order or 0.0)[len(cpu_runs) // 2]
    per_order = "n/a" if cpu.cpu_ms_per_order is None else f"{cpu.cpu_ms_per_order:.1f}"
    speed = "n/a" if cpu.rate is None else f"{cpu.rate:.1f}"
    each = ", ".join(f"{r.cpu_ms_per_order:.1f}" for r in cpu_runs
                     if r.cpu_ms_per_order is not None)
    print(f"engine CPU per order (1 worker, no delay, {args.cpu_orders} orders new -> {REST}): "
          f"{per_order} ms ({speed} orders/s; median of {len(cpu_runs)} runs: {each} ms)")
    if cpu.warmup_ms_per_order is not None:
        print(f"  after a warm-up of {args.cpu_warmup} orders in the same worker, not counted "
              f"(its first orders: {cpu.warmup_ms_per_order:.1f} ms each; --cpu-warmup 0 "
              f"counts them)")
    if counted.statements is not None:
        total = sum(counted.statements.values())
        print(f"SQL statements per order: {total / args.cpu_orders:.1f}, commits per order: "
              f"{(counted.commits or 0) / args.cpu_orders:.1f}")
        top = sorted(counted.statements.items(), key=lambda kv: -kv[1])[: args.statements]
        for text, n in top:
            print(f"  {n / args.cpu_orders:6.2f}  {text}")
    if args.profile:
        print(f"profile of the counted run's worker: {args.profile}")
    print(f"load after: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
