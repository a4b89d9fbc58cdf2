"""Bulk-event benchmark: how long does `event EVENT --from-csv FILE` take for 1,000 rows?

Not a test: it prints figures and never asserts timing. For each database (``--db``,
repeatable: ``sqlite`` or a server URL on which a throw-away database is created and dropped;
default ``sqlite`` plus PostgreSQL when it answers) it measures, in the same run:

A. **engine only** (``bench/processes/BenchBulk01.yaml``: ``ready --ship--> shipped``, no
   command): N orders (``--rows``, default 1,000) per variant, placed with ``fire=False``
   (setup, not measured), then
   - *baseline*: a Python loop calling ``Engine.trigger("ship", ref)`` once per order (the
     strongest way known to fire one event for many orders without this feature);
   - ``run_bulk_event`` on a 1,000-row CSV at concurrency 1 and at ``--concurrency`` (4);
   - the ``--dry-run`` of the same file (checks only).
B. **with the gateway** (``--gateway-rows``, default 200; 0 skips it): invoice orders through
   the sandbox on loopback to ``ready for shipment``, its ``CONFIRMATION_DELIVER`` answers
   delayed by ``--delay-ms`` (50): the same loop baseline and bulk run at concurrency 1 and K.

Each variant gets its own orders, so no variant profits from another's work.

    python bench/bulk_events.py
    python bench/bulk_events.py --rows 1000 --db sqlite --gateway-rows 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.tick import DEFAULT_PG, server_answers, throwaway_database  # noqa: E402

PROCESS_DIR = HERE / "processes"
EVENT = "ship"


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def order_doc(ref: str, process: str) -> dict[str, Any]:
    from bench.tick import ORDER_TEMPLATE

    return {**ORDER_TEMPLATE, "order_ref": ref, "process": process,
            "items": [{"sku": "SKU-100", "name": "Mug", "quantity": 2,
                       "unit_price_gross": "12.50", "tax_rate": "19"}]}


def place(engine: Any, prefix: str, n: int, make: Callable[[str], dict[str, Any]],
          fire: bool) -> list[str]:
    refs = [f"{prefix}{i:05d}" for i in range(n)]
    for ref in refs:
        engine.place_order(make(ref), fire=fire)
    return refs


def write_csv(folder: Path, name: str, refs: list[str]) -> Path:
    path = folder / f"{name}.csv"
    path.write_text("order_ref\n" + "\n".join(refs) + "\n", encoding="utf-8")
    return path


def timed(label: str, rows: int, func: Callable[[], Any], out: list[tuple[str, float, int]]
          ) -> Any:
    start = time.perf_counter()
    result = func()
    out.append((label, time.perf_counter() - start, rows))
    return result


def print_table(db: str, part: str, figures: list[tuple[str, float, int]]) -> None:
    base = figures[0][1]
    print(f"[{db}] {part}")
    for label, seconds, rows in figures:
        print(f"[{db}]   {label:<34} {seconds:8.2f} s  {rows / seconds:8.0f} rows/s  "
              f"x{base / seconds:5.2f} vs baseline")


def bench_engine_only(url: str, db: str, rows: int, concurrency: int, tmp: Path) -> None:
    from ratepay_oms import Engine
    from ratepay_oms.console.bulk import read_event_rows, run_bulk_event

    engine = Engine(url, process_dir=PROCESS_DIR)
    engine.upgrade_db()

    def make(ref: str) -> dict[str, Any]:
        return order_doc(ref, "BenchBulk01")

    sets = {name: place(engine, name, rows, make, fire=False)
            for name in ("L", "B", "K")}
    files = {name: write_csv(tmp, name, refs) for name, refs in sets.items()}
    figures: list[tuple[str, float, int]] = []
    timed(f"baseline: Engine.trigger x{rows}", rows,
          lambda: [engine.trigger(EVENT, ref) for ref in sets["L"]], figures)
    dry = timed("bulk --dry-run (checks only)", rows,
                lambda: run_bulk_event(engine, EVENT, read_event_rows(files["B"]),
                                       dry_run=True), figures)
    one = timed("bulk, concurrency 1", rows,
                lambda: run_bulk_event(engine, EVENT, read_event_rows(files["B"]),
                                       concurrency=1), figures)
    many = timed(f"bulk, concurrency {concurrency}", rows,
                 lambda: run_bulk_event(engine, EVENT, read_event_rows(files["K"]),
                                        concurrency=concurrency), figures)
    assert dry.ok and one.ok and many.ok, "a bench row was refused"
    print_table(db, f"A. engine only, {rows} rows, event without a command", figures)
    engine.close()


def bench_gateway(url: str, db: str, rows: int, concurrency: int, delay_ms: int,
                  tmp: Path) -> None:
    from ratepay_oms.console.bulk import read_event_rows, run_bulk_event
    from ratepay_oms.demo import demo_engine, example_order
    from ratepay_oms.sandbox.faults import Fault
    from ratepay_oms.sandbox.testing import start_sandbox

    sandbox = start_sandbox()
    engine = demo_engine(url, sandbox.settings)
    try:
        sets = {name: place(engine, f"G{name}", rows, example_order, fire=True)
                for name in ("L", "B", "K")}
        if delay_ms:
            sandbox.gateway.add_fault(Fault.parse("delay:CONFIRMATION_DELIVER",
                                                  delay_s=delay_ms / 1000))
        files = {name: write_csv(tmp, f"g{name}", refs) for name, refs in sets.items()}
        figures: list[tuple[str, float, int]] = []
        timed(f"baseline: Engine.trigger x{rows}", rows,
              lambda: [engine.trigger(EVENT, ref) for ref in sets["L"]], figures)
        one = timed("bulk, concurrency 1", rows,
                    lambda: run_bulk_event(engine, EVENT, read_event_rows(files["B"]),
                                           concurrency=1), figures)
        many = timed(f"bulk, concurrency {concurrency}", rows,
                     lambda: run_bulk_event(engine, EVENT, read_event_rows(files["K"]),
                                            concurrency=concurrency), figures)
        assert one.ok and many.ok, [r for r in many.rows if not r.ok][:3]
        print_table(db, f"B. with the gateway ({rows} rows, CONFIRMATION_DELIVER answered "
                        f"after {delay_ms} ms, floor {rows * delay_ms / 1000:.1f} s serial)",
                    figures)
    finally:
        engine.close()
        sandbox.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--gateway-rows", type=int, default=200)
    parser.add_argument("--delay-ms", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--db", action="append", default=None)
    args = parser.parse_args()
    dbs = args.db or (["sqlite"] + ([DEFAULT_PG] if server_answers(DEFAULT_PG) else []))
    for spec in dbs:
        name = "sqlite" if spec == "sqlite" else spec.split("+")[0].split(":")[0]
        with tempfile.TemporaryDirectory(prefix="rpoms_bulk_") as tmp:
            with throwaway_database(spec) as url:
                bench_engine_only(url, name, args.rows, args.concurrency, Path(tmp))
            if args.gateway_rows:
                with throwaway_database(spec) as url:
                    bench_gateway(url, name, args.gateway_rows, args.concurrency,
                                  args.delay_ms, Path(tmp))


if __name__ == "__main__":
    main()
