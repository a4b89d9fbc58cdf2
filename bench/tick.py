"""Tick benchmark: how close does ``Engine.tick()`` come to the true SQL floor?

Not a test: it prints figures and never asserts timing. For each database and size it

1. seeds N items (``--items``, repeatable, default 100,000 and 400,000; ``--items-per-order``
   per order) in state ``new`` of ``bench/processes/BenchTick01.yaml``, whose only transition
   ``new → done`` is event-less and unconditional, and on the servers gathers the tables'
   statistics as their background work would within a minute (setup is not measured);
2. (a) times one ``Engine.tick()`` that moves all of them, in a fresh interpreter, and reads
   that process's peak RSS;
3. checks every write is there (items in ``done``, one history and one transition-log row
   each), re-creates the schema, seeds the same data again and (b) times the *floor* the
   same way: the same durable writes as set-based statements inside the database, in one
   transaction, on the project's own schema and indexes (``INSERT … SELECT`` for history and
   log, one ``DELETE`` of timeouts, one ``UPDATE``): the strongest SQL there is for them;
4. prints tick, floor, ratio tick/floor and peak memory, then one table of every run, with
   the peak-memory ratio of the largest size to the smallest per database (flat is ≈ 1).

Databases (``--db``, repeatable): ``sqlite`` (a file in a temp folder) or a server URL on which
a throw-away database ``rpoms_bench_<random>`` is created and dropped, so an existing
database is never touched. Default: ``sqlite`` plus PostgreSQL at
``postgresql+psycopg://postgres@127.0.0.1:5432/test`` and MariaDB at
``mysql+pymysql://root@127.0.0.1:3306/test`` when they answer.

    python bench/tick.py
    python bench/tick.py --items 20000 --db sqlite --db mysql+pymysql://root@127.0.0.1:3306/test
    python bench/tick.py --items 20000 --db sqlite --profile 25   # cProfile of the tick

``--profile N`` runs the tick under ``cProfile`` and prints its N costliest functions (by
cumulative and by own time) to stderr; the profiler slows the tick down, so the ratio of a
profiled run is not the one to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a script from anywhere in a checkout
    sys.path.insert(0, str(REPO))

PROCESS_DIR = HERE / "processes"
PROCESS = "BenchTick01"
SOURCE, TARGET = "new", "done"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_MARIADB = "mysql+pymysql://root@127.0.0.1:3306/test"
ORDER_TEMPLATE: dict[str, object] = {
    "order_ref": "B0",
    "process": PROCESS,
    "currency": "EUR",
    "customer": {
        "customer_ref": "C-BENCH",
        "first_name": "Erika",
        "last_name": "Mustermann",
        "date_of_birth": "1974-08-12",
        "email": "erika.mustermann@example.org",
        "billing_address": {
            "street": "Heidestraße 17",
            "zip_code": "51147",
            "city": "Köln",
            "country_code": "DE",
        },
    },
    "items": [
        {
            "sku": "SKU-100",
            "name": "Mug",
            "quantity": 4,
            "unit_price_gross": "12.50",
            "tax_rate": "19",
        }
    ],
    "payment": {"method": "INVOICE"},
}
SEED_CHUNK = 5000


@dataclass(frozen=True)
class Figures:
    database: str
    items: int
    tick_s: float
    floor_s: float
    moved: int
    tick_peak_mib: float
    floor_peak_mib: float
    tick_missing: str
    floor_missing: str

    @property
    def ratio(self) -> float:
        return self.tick_s / self.floor_s if self.floor_s > 0 else float("inf")

    def lines(self) -> list[str]:
        db, n = f"[{self.database} {self.items}]", self.items
        lines = [
            f"{db} moved by tick: {self.moved}",
            f"{db} tick : {self.tick_s:8.3f} s  {n / self.tick_s:10.0f} items/s"
            f"  peak RSS {self.tick_peak_mib:7.1f} MiB",
            f"{db} floor: {self.floor_s:8.3f} s  {n / self.floor_s:10.0f} items/s"
            f"  peak RSS {self.floor_peak_mib:7.1f} MiB",
            f"{db} ratio tick/floor: {self.ratio:.2f}",
        ]
        if self.tick_missing:
            lines.append(f"{db} WARNING: writes missing after the tick: {self.tick_missing}")
        if self.floor_missing:
            lines.append(f"{db} WARNING: writes missing after the floor: {self.floor_missing}")
        return lines


def table(all_figures: list[Figures]) -> list[str]:
    """One line per run, then the peak-memory growth per database (largest / smallest N)."""
    out = [
        f"{'database':<11} {'items':>8} {'tick s':>8} {'floor s':>8} {'tick/floor':>10} "
        f"{'tick MiB':>9} {'floor MiB':>9}"
    ]
    for f in all_figures:
        out.append(
            f"{f.database:<11} {f.items:>8} {f.tick_s:>8.3f} {f.floor_s:>8.3f} {f.ratio:>10.2f} "
            f"{f.tick_peak_mib:>9.1f} {f.floor_peak_mib:>9.1f}"
        )
    for db in dict.fromkeys(f.database for f in all_figures):
        runs = sorted((f for f in all_figures if f.database == db), key=lambda f: f.items)
        if len(runs) > 1:
            small, large = runs[0], runs[-1]
            out.append(
                f"{db}: tick peak RSS at {large.items} / at {small.items} items: "
                f"{large.tick_peak_mib / small.tick_peak_mib:.2f}"
            )
    return out


# -- databases -----------------------------------------------------------------------------


@contextmanager
def throwaway_database(spec: str) -> Iterator[str]:
    """A URL of an empty database that is removed afterwards (never an existing one)."""
    if spec == "sqlite":
        with tempfile.TemporaryDirectory(prefix="rpoms_bench_") as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.sqlite'}"
        return
    admin_url = sa.engine.make_url(spec)
    name = f"rpoms_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if admin_url.get_backend_name() == "postgresql" else ""
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}{force}"))
        admin.dispose()


def server_answers(url: str) -> bool:
    parsed = sa.engine.make_url(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 5432), 1.0):
            pass
        eng = sa.create_engine(parsed, pool_pre_ping=True)
        with eng.connect():
            pass
        eng.dispose()
    except Exception:
        return False
    return True


def fresh_schema(url: str) -> None:
    """Drop everything and migrate to head, so both measurements start from the same state."""
    import ratepay_oms.persistence.models  # noqa: F401  (registers the tables)
    from ratepay_oms.persistence.base import Base
    from ratepay_oms.persistence.db import create_db_engine, upgrade

    eng = create_db_engine(url)
    with eng.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
    eng.dispose()
    upgrade(url)


# -- seeding -------------------------------------------------------------------------------


def _order_template() -> dict[str, object]:
    """A valid order as the engine stores it (``OrderInput.to_dict()``)."""
    from ratepay_oms.orders import parse_order

    return parse_order(ORDER_TEMPLATE).to_dict()


def seed(url: str, items: int, per_order: int, now: datetime) -> None:
    """Orders and their items in state ``new`` (what ``place_order(fire=False)`` leaves behind,
    minus the history rows, which the tick does not read). Orders go in as bulk inserts; the
    items, four times as many, as one ``INSERT … SELECT`` per chunk of orders, so seeding
    400,000 items takes seconds, not minutes (setup is not measured)."""
    from ratepay_oms.persistence.base import Base
    from ratepay_oms.persistence.db import create_db_engine

    order_t = Base.metadata.tables["oms_order"]
    item_t = Base.metadata.tables["oms_order_item"]
    template = _order_template()
    orders = (items + per_order - 1) // per_order
    entered = now - timedelta(minutes=5)
    eng = create_db_engine(url)
    with eng.begin() as conn:
        for start in range(0, orders, SEED_CHUNK):
            refs = [f"B{n:08d}" for n in range(start, min(orders, start + SEED_CHUNK))]
            conn.execute(
                sa.insert(order_t),
                [
                    {
                        "order_ref": ref,
                        "process": PROCESS,
                        "currency": "EUR",
                        "customer_ref": "C-BENCH",
                        "data": json.dumps({**template, "order_ref": ref, "process": PROCESS}),
                        "goods_total": Decimal("12.50") * per_order,
                        "created_at": entered,
                    }
                    for ref in refs
                ],
            )
        ids = [
            row[0]
            for row in conn.execute(
                sa.select(order_t.c.id).where(order_t.c.process == PROCESS).order_by(order_t.c.id)
            )
        ]
        # Every order gets ``per_order`` items but the last, which gets what is left over.
        full, rest = divmod(items, per_order)
        columns = {
            "line_no": 0,
            "sku": "SKU-100",
            "name": "Mug",
            "unit_price_gross": Decimal("12.50"),
            "tax_rate": Decimal("19.00"),
            "discount": Decimal("0.00"),
            "process": PROCESS,
            "state": SOURCE,
            "state_entered_at": entered,
            "attempts": 0,
        }

        def insert_items(order_ids: list[int], copies: int) -> None:
            if not order_ids or not copies:
                return
            series = sa.union_all(
                *(sa.select(sa.literal(k, sa.Integer).label("k")) for k in range(copies))
            ).subquery()
            values = [sa.literal(v, item_t.c[name].type) for name, v in columns.items()]
            conn.execute(
                sa.insert(item_t).from_select(
                    ["order_id", *columns],
                    sa.select(order_t.c.id, *values)
                    .select_from(order_t.join(series, sa.true()))
                    .where(order_t.c.id.in_(order_ids))
                    .order_by(order_t.c.id, series.c.k),
                )
            )

        for start in range(0, full, SEED_CHUNK):
            insert_items(ids[start : min(full, start + SEED_CHUNK)], per_order)
        if rest:
            insert_items([ids[full]], rest)
    analyze(eng)
    eng.dispose()


def analyze(eng: sa.Engine) -> None:
    """Statistics for the freshly loaded tables, as the server's own background work
    (PostgreSQL's autovacuum, InnoDB's persistent statistics) has them within a minute of a
    bulk load: without them PostgreSQL takes the 400,000-row item table for a few pages and
    plans a sequential scan for every statement that picks a batch of orders' items."""
    tables = ("oms_order", "oms_order_item", "oms_event_timeout")
    if eng.dialect.name == "postgresql":
        with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f"ANALYZE {', '.join(tables)}"))
    elif eng.dialect.name in ("mysql", "mariadb"):
        with eng.connect() as conn:
            conn.execute(sa.text(f"ANALYZE TABLE {', '.join(tables)}")).all()


# -- the two measurements ------------------------------------------------------------------


def measure_tick(url: str, now: datetime, profile: int = 0) -> tuple[float, int]:
    from ratepay_oms import Engine

    engine = Engine(url, process_dir=PROCESS_DIR)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    result = engine.tick(now=now)
    elapsed = time.perf_counter() - started
    if profiler is not None:
        import pstats

        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(profile)
        stats.sort_stats("tottime").print_stats(profile)
    engine.close()
    return elapsed, int(result.items_moved)


def measure_floor(url: str, now: datetime) -> tuple[float, int]:
    """The true floor: the same durable writes as the tick, done entirely inside the database
    with the least SQL there is: one ``INSERT … SELECT`` for the history rows, one for the
    transition-log rows (with the same origin columns the engine writes), one ``DELETE`` of
    the items' timeouts, and one ``UPDATE`` of the items (state, entry time, retry cleared),
    in one transaction, on the project's own schema and indexes. No row travels through
    Python: nothing any engine could do with these tables is cheaper."""
    from ratepay_oms.engine.persist import Origin
    from ratepay_oms.persistence.base import Base
    from ratepay_oms.persistence.db import create_db_engine

    item_t = Base.metadata.tables["oms_order_item"]
    hist_t = Base.metadata.tables["oms_state_history"]
    log_t = Base.metadata.tables["oms_transition_log"]
    timeout_t = Base.metadata.tables["oms_event_timeout"]
    origin = Origin.current()
    eng = create_db_engine(url)
    waiting = (item_t.c.process == PROCESS) & (item_t.c.state == SOURCE)

    def lit(table: sa.Table, column: str, value: object) -> sa.ColumnElement[object]:
        return sa.null() if value is None else sa.literal(value, table.c[column].type)

    started = time.perf_counter()
    with eng.begin() as conn:
        conn.execute(
            sa.insert(hist_t).from_select(
                ["item_id", "order_id", "from_state", "to_state", "event", "created_at"],
                sa.select(
                    item_t.c.id,
                    item_t.c.order_id,
                    lit(hist_t, "from_state", SOURCE),
                    lit(hist_t, "to_state", TARGET),
                    sa.null(),
                    lit(hist_t, "created_at", now),
                )
                .where(waiting)
                .order_by(item_t.c.id),
            )
        )
        log_values = {
            "process": PROCESS,
            "event": None,
            "source_state": SOURCE,
            "target_state": TARGET,
            "command": None,
            "condition": None,
            "is_error": False,
            "error_message": None,
            "hostname": origin.hostname,
            "argv": origin.argv,
            "created_at": now,
        }
        conn.execute(
            sa.insert(log_t).from_select(
                ["item_id", "order_id", *log_values],
                sa.select(
                    item_t.c.id,
                    item_t.c.order_id,
                    *(lit(log_t, k, v) for k, v in log_values.items()),
                )
                .where(waiting)
                .order_by(item_t.c.id),
            )
        )
        conn.execute(
            sa.delete(timeout_t).where(
                timeout_t.c.item_id.in_(sa.select(item_t.c.id).where(waiting))
            )
        )
        moved = conn.execute(
            sa.update(item_t)
            .where(waiting)
            .values(
                state=TARGET,
                state_entered_at=now,
                retry_event=None,
                retry_at=None,
                attempts=0,
                last_error=None,
            )
        ).rowcount
    elapsed = time.perf_counter() - started
    eng.dispose()
    return elapsed, int(moved)


def check_writes(url: str, items: int) -> str:
    """What a measured run left behind: every item in the target, one history and one
    transition-log row per item. Returns '' when complete, else what is missing."""
    from ratepay_oms.persistence.base import Base
    from ratepay_oms.persistence.db import create_db_engine

    tables = Base.metadata.tables
    item_t = tables["oms_order_item"]
    eng = create_db_engine(url)
    with eng.connect() as conn:
        moved = conn.scalar(
            sa.select(sa.func.count()).select_from(item_t).where(item_t.c.state == TARGET)
        )
        history = conn.scalar(
            sa.select(sa.func.count())
            .select_from(tables["oms_state_history"])
            .where(tables["oms_state_history"].c.to_state == TARGET)
        )
        logged = conn.scalar(
            sa.select(sa.func.count())
            .select_from(tables["oms_transition_log"])
            .where(tables["oms_transition_log"].c.target_state == TARGET)
        )
    eng.dispose()
    missing = [
        f"{name} {count}/{items}"
        for name, count in (("items moved", moved), ("history", history), ("log", logged))
        if count != items
    ]
    return ", ".join(missing)


def _measure_child(kind: str, url: str, profile: int) -> dict[str, float]:
    """Run one measurement in a fresh interpreter, so its peak RSS is its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", kind, "--url", url]
    if profile:
        cmd += ["--profile", str(profile)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if out.stderr and profile:
        print(out.stderr, file=sys.stderr)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _run_measure(kind: str, url: str, profile: int) -> int:
    """The child's side of ``_measure_child``: one measurement, one JSON line."""
    import resource

    if kind == "tick":
        seconds, moved = measure_tick(url, NOW, profile)
    else:
        seconds, moved = measure_floor(url, NOW)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "moved": moved, "peak_mib": peak_mib}))
    return 0


NOW = datetime(2024, 5, 1, 12, 0, 0)


def bench_one(spec: str, items: int, per_order: int, profile: int = 0) -> Figures:
    with throwaway_database(spec) as url:
        fresh_schema(url)
        seed(url, items, per_order, NOW)
        tick = _measure_child("tick", url, profile)
        missing = check_writes(url, items)
        fresh_schema(url)
        seed(url, items, per_order, NOW)
        floor = _measure_child("floor", url, 0)
        floor_missing = check_writes(url, items)
    name = sa.engine.make_url(url).get_backend_name()
    return Figures(
        name,
        items,
        tick["seconds"],
        floor["seconds"],
        int(tick["moved"]),
        tick["peak_mib"],
        floor["peak_mib"],
        missing or "",
        floor_missing or "",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--items",
        type=int,
        action="append",
        default=None,
        help="items to move (repeatable; default 100000 and 400000)",
    )
    parser.add_argument("--items-per-order", type=int, default=4, help="items per order (4)")
    parser.add_argument(
        "--db",
        action="append",
        default=None,
        metavar="URL",
        help="'sqlite' or a server URL to create a throw-away database on (repeatable); "
        f"default: sqlite, plus {DEFAULT_PG} and {DEFAULT_MARIADB} when they answer",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="run the tick under cProfile and print its N costliest functions (0: off)",
    )
    parser.add_argument("--measure", choices=("tick", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.pop("RATEPAY_OMS_PLUGINS", None)  # measure the engine, not a host's plugins
    if args.measure:
        return _run_measure(args.measure, args.url, args.profile)
    sizes = args.items or [100_000, 400_000]
    if min(sizes) < 1 or args.items_per_order < 1:
        parser.error("--items and --items-per-order must be at least 1")
    specs = args.db or [
        "sqlite",
        *(url for url in (DEFAULT_PG, DEFAULT_MARIADB) if server_answers(url)),
    ]
    print(f"command: python bench/tick.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"items: {sizes}, items per order: {args.items_per_order}, load: {os.getloadavg()}")
    failed = False
    results: list[Figures] = []
    for spec in specs:
        for items in sizes:
            figures = bench_one(spec, items, args.items_per_order, args.profile)
            results.append(figures)
            for line in figures.lines():
                print(line, flush=True)
            if figures.moved != items or figures.tick_missing or figures.floor_missing:
                print(f"[{figures.database}] WARNING: the figures are not comparable", flush=True)
                failed = True
    print()
    for line in table(results):
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
