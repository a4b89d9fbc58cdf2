"""Idle tick benchmark: what does one ``tick --loop`` iteration cost when nothing is due?

Not a test: it prints figures and never asserts timing. A worker polls every ``--interval``
seconds (the soak runs eight at 0.2 s), so the CPU of an iteration that finds nothing is paid
all the time. For each database it

1. seeds N items (``--items``, default 20,000) of ``bench/processes/BenchTick01.yaml`` and lets
   one tick move them to their final state ``done`` (at rest: nothing due);
2. in this process, after a few warm-up rounds, measures the CPU time (``process_time``, the
   worker's own share, not the database server's) per round of: ``Engine.tick()`` with the
   built-in processes (what ``ratepay-oms tick`` runs), the same with the bench process
   directory, the ``--loop`` schema check (``_database_problem``), and a whole CLI iteration
   as ``_run_one`` does it (tick, ``gateway_calls``, the JSON document) plus the schema check
   when the loop runs it every round (``--with-schema-check``, what the loop did before it
   skipped the check after a good tick);
3. with ``--explain`` prints PostgreSQL's plan of the tick's idle probe.

Compare a change by running this file against both checkouts in the same window (the figures
depend on the machine's load): ``PYTHONPATH=<other checkout> python bench/idle_tick.py``.

    python bench/idle_tick.py
    python bench/idle_tick.py --items 20000 --db sqlite --rounds 200
    python bench/idle_tick.py --db postgresql+psycopg://postgres@127.0.0.1:5432/test --explain
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tick import (  # noqa: E402  (the tick bench's seeding and throw-away databases)
    PROCESS_DIR,
    fresh_schema,
    seed,
    server_answers,
    throwaway_database,
)

DEFAULT_SERVERS = ("postgresql+psycopg://postgres@127.0.0.1:5432/test",)


def cpu_ms(fn: Callable[[], object], rounds: int) -> float:
    """CPU milliseconds of this process per call of ``fn`` (after five warm-up calls)."""
    for _ in range(5):
        fn()
    started = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - started) / rounds * 1000


def explain_probe(url: str) -> None:
    """PostgreSQL's plan of the tick's idle probe (``EXPLAIN ANALYZE``), if this checkout has
    one."""
    import sqlalchemy as sa

    from ratepay_oms.cli._common import engine_from_options
    from ratepay_oms.engine import tick as tick_module

    probe = getattr(tick_module, "_due_probe", None)
    if probe is None:
        print("  (no idle probe in this checkout)")
        return
    engine = engine_from_options(url, None, concurrency=1)
    seen: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append((statement, parameters))

    db = engine.db
    sa.event.listen(db, "before_cursor_execute", capture)
    engine.tick()
    sa.event.remove(db, "before_cursor_execute", capture)
    statement, parameters = next(s for s in seen if "EXISTS" in s[0].upper())
    with db.connect() as conn:
        for (line,) in conn.exec_driver_sql("EXPLAIN ANALYZE " + statement, parameters):
            print("  " + line)
    engine.close()


def bench_one(spec: str, items: int, rounds: int, with_check: bool, explain: bool) -> None:
    from ratepay_oms import Engine
    from ratepay_oms.cli._common import engine_from_options, gateway_calls
    from ratepay_oms.cli.tick import _database_problem

    with throwaway_database(spec) as url:
        fresh_schema(url)
        now = datetime.now(UTC).replace(tzinfo=None)
        seed(url, items, 4, now)
        bench = Engine(url, process_dir=PROCESS_DIR)
        moved = bench.tick().items_moved
        builtin = engine_from_options(url, None, concurrency=4)

        def iteration() -> None:
            if with_check:
                _database_problem(builtin)
            result = builtin.tick()
            gateway_calls(builtin)
            result.to_json()

        figures = {
            "tick (built-in processes)": cpu_ms(builtin.tick, rounds),
            "tick (bench process)": cpu_ms(bench.tick, rounds),
            "schema check": cpu_ms(lambda: _database_problem(builtin), rounds),
            "CLI iteration" + (" + schema check" if with_check else ""): cpu_ms(iteration, rounds),
        }
        name = sa_backend(url)
        import ratepay_oms

        print(f"{name}: {items} items at rest ({moved} moved there), {rounds} rounds "
              f"[{Path(ratepay_oms.__file__).parent.parent}]")
        for label, ms in figures.items():
            print(f"  {label:<40} {ms:7.2f} ms CPU")
        builtin.close()
        bench.close()
        if explain and name == "postgresql":
            explain_probe(url)


def sa_backend(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).get_backend_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--items", type=int, default=20_000, help="items at rest (20,000)")
    parser.add_argument("--rounds", type=int, default=100, help="measured rounds (100)")
    parser.add_argument("--db", action="append", help="sqlite or a server URL (repeatable)")
    parser.add_argument("--with-schema-check", action="store_true",
                        help="count the schema check in every CLI iteration (the old loop)")
    parser.add_argument("--explain", action="store_true", help="PostgreSQL plan of the probe")
    args = parser.parse_args(argv)
    specs = args.db or ["sqlite", *(u for u in DEFAULT_SERVERS if server_answers(u))]
    for spec in specs:
        bench_one(spec, args.items, args.rounds, args.with_schema_check, args.explain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
