"""Prune benchmark: time and peak memory of pruning 1,000,000 history rows, against the
bare single statement that deletes the same rows.

Not a test: it prints figures and never asserts them. For each database it

1. seeds ``--orders`` finished orders (default 50,000; ``--items-per-order`` 2) whose items
   rest in the final state ``done`` of ``bench/processes/BenchTick01.yaml`` since two years,
   and ``--rows`` history rows (default 1,000,000) spread over them, with bulk inserts
   (setup is not measured);
2. runs, each in a child process of its own on a fresh copy of the seeded database:
   (a) ``Pruner.run(--what history)`` with an archive; (b) the same without one;
   (c) the *baseline* for (b): one ``DELETE … WHERE created_at < cutoff AND order_id IN
   (finished orders)`` in one transaction, the fastest way known to remove the rows (and the
   one that holds its locks for the whole run); (d) the baseline for (a): the same DELETE after
   one streaming SELECT of the rows written with the same gzip JSON Lines encoder;
3. prints the time, the child's peak resident memory (``VmHWM``), the longest
   transaction (how long a table is locked at most) and the ratio to its baseline.

    python bench/prune.py
    python bench/prune.py --rows 200000 --db sqlite --db postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.tick import (  # noqa: E402  (after the path fix above)
    PROCESS,
    PROCESS_DIR,
    TARGET,
    _order_template,
    fresh_schema,
    throwaway_database,
)

NOW = datetime(2026, 6, 1, 12, 0, 0)
CUTOFF = NOW - timedelta(days=365)
CHUNK = 10_000

CHILD = r"""
import json, sys, time
from datetime import datetime
import sqlalchemy as sa
from sqlalchemy import event

longest = 0.0
opened = {}

@event.listens_for(sa.engine.Engine, "begin")
def _begin(conn):
    opened[id(conn)] = time.perf_counter()

def _end(conn):
    global longest
    started = opened.pop(id(conn), None)
    if started is not None:
        longest = max(longest, time.perf_counter() - started)

event.listen(sa.engine.Engine, "commit", _end)
event.listen(sa.engine.Engine, "rollback", _end)

mode, url, process_dir, cutoff, archive = sys.argv[1:6]
cutoff = datetime.fromisoformat(cutoff)
if mode in ("baseline", "baseline-archive"):
    from ratepay_oms.console.prune import _Archive
    from ratepay_oms.persistence.db import create_db_engine
    from ratepay_oms.persistence.models import StateHistory
    from pathlib import Path
    eng = create_db_engine(url)
    started = time.perf_counter()
    with eng.begin() as conn:
        if mode == "baseline-archive":
            sink = _Archive(Path(archive))
            table = StateHistory.__table__
            result = conn.execute(sa.select(table).where(table.c.created_at < cutoff)
                                  .execution_options(yield_per=5000))
            keys = list(result.keys())
            for part in result.partitions():
                sink.write(table.name, [dict(zip(keys, r)) for r in part])
            sink.sync()
            sink.close()
        removed = conn.execute(sa.text(
            "DELETE FROM oms_state_history WHERE created_at < :c AND order_id IN ("
            " SELECT o.id FROM oms_order o WHERE NOT EXISTS ("
            "  SELECT 1 FROM oms_order_item i WHERE i.order_id = o.id"
            "  AND (i.state <> :final OR i.state_entered_at >= :c)))"
        ), {"c": cutoff, "final": "done"}).rowcount
else:
    from ratepay_oms import Engine
    from ratepay_oms.console.prune import Pruner
    engine = Engine(url, process_dir=process_dir)
    started = time.perf_counter()
    report = Pruner(engine.session, engine.definitions()).run(
        cutoff, ["history"], archive=archive if mode == "archive" else None)
    removed = report.removed["history"]
elapsed = time.perf_counter() - started
# Peak resident memory of this process since it was exec'ed (rusage would include what the
# parent held when it forked).
with open("/proc/self/status") as status:
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"seconds": elapsed, "removed": removed, "longest_transaction": longest,
                  "peak_rss_mb": hwm_kb / 1024}))
"""


def seed(url: str, orders: int, per_order: int, rows: int) -> None:
    """Finished orders (items in ``done`` for two years) and ``rows`` old history rows."""
    from ratepay_oms.persistence.base import Base
    from ratepay_oms.persistence.db import create_db_engine

    order_t = Base.metadata.tables["oms_order"]
    item_t = Base.metadata.tables["oms_order_item"]
    hist_t = Base.metadata.tables["oms_state_history"]
    data = json.dumps(_order_template())
    long_ago = NOW - timedelta(days=730)
    eng = create_db_engine(url)
    with eng.begin() as conn:
        for start in range(0, orders, CHUNK):
            conn.execute(sa.insert(order_t), [
                {"order_ref": f"B{n:08d}", "process": PROCESS, "currency": "EUR",
                 "customer_ref": "C-BENCH", "data": data, "goods_total": 25,
                 "created_at": long_ago}
                for n in range(start, min(orders, start + CHUNK))
            ])
        ids = list(conn.execute(sa.select(order_t.c.id).order_by(order_t.c.id)).scalars())
        items = [
            {"order_id": oid, "line_no": 0, "sku": "SKU-100", "name": "Mug",
             "unit_price_gross": 12.5, "tax_rate": 19, "discount": 0, "process": PROCESS,
             "state": TARGET, "state_entered_at": long_ago, "attempts": 0}
            for oid in ids for _ in range(per_order)
        ]
        for start in range(0, len(items), CHUNK):
            conn.execute(sa.insert(item_t), items[start:start + CHUNK])
        item_ids = list(conn.execute(
            sa.select(item_t.c.id, item_t.c.order_id).order_by(item_t.c.id)).all())
        batch = []
        for n in range(rows):
            item_id, order_id = item_ids[n % len(item_ids)]
            batch.append({"item_id": item_id, "order_id": order_id, "from_state": "new",
                          "to_state": TARGET, "event": None,
                          "created_at": long_ago + timedelta(seconds=n % 3600)})
            if len(batch) == CHUNK:
                conn.execute(sa.insert(hist_t), batch)
                batch = []
        if batch:
            conn.execute(sa.insert(hist_t), batch)
    # Statistics, as autovacuum (or SQLite's ANALYZE) keeps them in a live database: without
    # them PostgreSQL plans a batch's read by order_id as a scan of the whole table.
    with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))
    eng.dispose()


@contextmanager
def copy_of(template: str, orders: int, per_order: int, rows: int) -> Iterator[str]:
    """A fresh copy of the seeded database: a file copy (SQLite), ``CREATE DATABASE …
    TEMPLATE`` (PostgreSQL), or seeding again (others)."""
    parsed = sa.engine.make_url(template)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        source = Path(parsed.database or "")
        target = source.with_name(f"copy-{secrets.token_hex(3)}.sqlite")
        shutil.copyfile(source, target)
        try:
            yield f"sqlite:///{target}"
        finally:
            target.unlink(missing_ok=True)
        return
    if backend != "postgresql":
        with throwaway_database(parsed.set(database="test").render_as_string(False)) as url:
            fresh_schema(url)
            seed(url, orders, per_order, rows)
            yield url
        return
    name = f"{parsed.database}_c{secrets.token_hex(2)}"
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name} TEMPLATE {parsed.database}"))
    try:
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def run_child(mode: str, url: str, archive: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RATEPAY_OMS_PLUGINS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, url, str(PROCESS_DIR), CUTOFF.isoformat(),
         str(archive)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"{mode} failed:\n{err}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="history rows (1000000)")
    parser.add_argument("--orders", type=int, default=50_000, help="finished orders (50000)")
    parser.add_argument("--items-per-order", type=int, default=2, help="items per order (2)")
    parser.add_argument("--db", action="append", default=None, metavar="URL",
                        help="'sqlite' or a server URL for a throw-away database (repeatable)")
    args = parser.parse_args(argv)
    print(f"command: python bench/prune.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"history rows: {args.rows}, finished orders: {args.orders}, "
          f"items per order: {args.items_per_order}")
    failed = False
    for spec in args.db or ["sqlite"]:
        with throwaway_database(spec) as template:
            name = f"[{sa.engine.make_url(template).get_backend_name()}]"
            fresh_schema(template)
            started = time.perf_counter()
            seed(template, args.orders, args.items_per_order, args.rows)
            print(f"{name} seeded in {time.perf_counter() - started:.1f} s", flush=True)
            results = {}
            for mode in ("archive", "plain", "baseline", "baseline-archive"):
                archive = Path(tempfile.gettempdir()) / f"rpoms-prune-{os.getpid()}-{mode}.jsonl.gz"
                archive.unlink(missing_ok=True)
                with copy_of(template, args.orders, args.items_per_order, args.rows) as url:
                    figures = run_child(mode, url, archive)
                if archive.exists():
                    figures["archive_mb"] = archive.stat().st_size / 1e6
                    archive.unlink()
                results[mode] = figures
                if figures["removed"] != args.rows:
                    print(f"{name} WARNING: {mode} removed {figures['removed']} of {args.rows}")
                    failed = True
            baselines = {"archive": "baseline-archive", "plain": "baseline"}
            for mode, f in results.items():
                base = results[baselines.get(mode, mode)]["seconds"]
                extra = f"  archive {f['archive_mb']:.1f} MB" if "archive_mb" in f else ""
                print(
                    f"{name} {mode:16}: {f['seconds']:7.2f} s  {args.rows / f['seconds']:9.0f} "
                    f"rows/s  peak RSS {f['peak_rss_mb']:6.1f} MB  longest transaction "
                    f"{f['longest_transaction']:6.3f} s  ratio to {baselines.get(mode, mode)} "
                    f"{f['seconds'] / base:5.2f}{extra}",
                    flush=True,
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
