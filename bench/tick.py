"""Tick benchmark: how close does ``Engine.tick()`` come to the bare SQL it has to do?

Not a test: it prints figures and never asserts timing. For each database it

1. seeds N items (``--items``, default 100,000; ``--items-per-order`` per order) in state
   ``new`` of ``bench/processes/BenchTick01.yaml``, whose only transition ``new → done`` is
   event-less and unconditional, with bulk inserts (setup is not measured);
2. (a) times one ``Engine.tick()`` that moves all of them;
3. re-creates the schema, seeds the same data again and (b) times the *floor*: the same state
   updates plus one history row and one transition-log row per item, as bulk SQL statements
   in one transaction;
4. prints both times, items/s and the ratio tick/floor.

Databases (``--db``, repeatable): ``sqlite`` (a file in a temp folder) or a server URL on which
a throw-away database ``rpoms_bench_<random>`` is created and dropped, so an existing
database is never touched. Default: ``sqlite`` plus PostgreSQL at
``postgresql+psycopg://postgres@127.0.0.1:5432/test`` when it answers.

    python bench/tick.py
    python bench/tick.py --items 20000 --db sqlite --db mysql+pymysql://root@127.0.0.1:3306/test
    python bench/tick.py --items 20000 --db sqlite --profile 25   # cProfile of the tick

``--profile N`` runs the tick under ``cProfile`` and prints its N costliest functions (by
cumulative and by own time) after the figures; the profiler slows the tick down, so the ratio
of a profiled run is not the one to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
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
            "street": "Heidestraße 17", "zip_code": "51147", "city": "Köln", "country_code": "DE",
        },
    },
    "items": [{"sku": "SKU-100", "name": "Mug", "quantity": 4, "unit_price_gross": "12.50",
               "tax_rate": "19"}],
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

    def lines(self) -> list[str]:
        ratio = self.tick_s / self.floor_s if self.floor_s > 0 else float("inf")
        db, n = f"[{self.database}]", self.items
        return [
            f"{db} items: {n}  moved by tick: {self.moved}",
            f"{db} tick : {self.tick_s:8.3f} s  {n / self.tick_s:10.0f} items/s",
            f"{db} floor: {self.floor_s:8.3f} s  {n / self.floor_s:10.0f} items/s",
            f"{db} ratio tick/floor: {ratio:.2f}",
        ]


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
    """Bulk-insert orders and their items in state ``new`` (what ``place_order(fire=False)``
    leaves behind, minus the history rows, which the tick does not read)."""
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
        rows = []
        for n in range(items):
            rows.append(
                {
                    "order_id": ids[n // per_order],
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
            )
            if len(rows) == SEED_CHUNK:
                conn.execute(sa.insert(item_t), rows)
                rows = []
        if rows:
            conn.execute(sa.insert(item_t), rows)
    eng.dispose()


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
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("cumulative").print_stats(profile)
        stats.sort_stats("tottime").print_stats(profile)
    engine.close()
    return elapsed, int(result.items_moved)


def measure_floor(url: str, now: datetime) -> float:
    """The least SQL any engine must run for this tick: read the waiting items, one UPDATE,
    and one history plus one transition-log row per item, in one transaction."""
    from ratepay_oms.persistence.base import Base
    from ratepay_oms.persistence.db import create_db_engine

    item_t = Base.metadata.tables["oms_order_item"]
    hist_t = Base.metadata.tables["oms_state_history"]
    log_t = Base.metadata.tables["oms_transition_log"]
    hostname = socket.gethostname()
    argv = " ".join(sys.argv)
    eng = create_db_engine(url)
    waiting = (item_t.c.process == PROCESS) & (item_t.c.state == SOURCE)
    started = time.perf_counter()
    with eng.begin() as conn:
        rows = conn.execute(sa.select(item_t.c.id, item_t.c.order_id).where(waiting)).all()
        conn.execute(sa.update(item_t).where(waiting).values(state=TARGET, state_entered_at=now))
        conn.execute(
            sa.insert(hist_t),
            [
                {"item_id": i, "order_id": o, "from_state": SOURCE, "to_state": TARGET,
                 "event": None, "created_at": now}
                for i, o in rows
            ],
        )
        conn.execute(
            sa.insert(log_t),
            [
                {"item_id": i, "order_id": o, "process": PROCESS, "event": None,
                 "source_state": SOURCE, "target_state": TARGET, "command": None,
                 "condition": None, "is_error": False, "error_message": None,
                 "hostname": hostname, "argv": argv, "created_at": now}
                for i, o in rows
            ],
        )
    elapsed = time.perf_counter() - started
    eng.dispose()
    return elapsed


def bench_one(spec: str, items: int, per_order: int, profile: int = 0) -> Figures:
    now = datetime(2024, 5, 1, 12, 0, 0)
    with throwaway_database(spec) as url:
        fresh_schema(url)
        seed(url, items, per_order, now)
        tick_s, moved = measure_tick(url, now, profile)
        fresh_schema(url)
        seed(url, items, per_order, now)
        floor_s = measure_floor(url, now)
    name = sa.engine.make_url(url).get_backend_name()
    return Figures(name, items, tick_s, floor_s, moved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000, help="items to move (100000)")
    parser.add_argument("--items-per-order", type=int, default=4, help="items per order (4)")
    parser.add_argument(
        "--db",
        action="append",
        default=None,
        metavar="URL",
        help="'sqlite' or a server URL to create a throw-away database on (repeatable); "
        f"default: sqlite, plus {DEFAULT_PG} when it answers",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="run the tick under cProfile and print its N costliest functions (0: off)",
    )
    args = parser.parse_args(argv)
    if args.items < 1 or args.items_per_order < 1:
        parser.error("--items and --items-per-order must be at least 1")
    specs = args.db or ["sqlite", *([DEFAULT_PG] if server_answers(DEFAULT_PG) else [])]
    os.environ.pop("RATEPAY_OMS_PLUGINS", None)  # measure the engine, not a host's plugins
    print(f"command: python bench/tick.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"items: {args.items}, items per order: {args.items_per_order}")
    failed = False
    for spec in specs:
        figures = bench_one(spec, args.items, args.items_per_order, args.profile)
        for line in figures.lines():
            print(line, flush=True)
        if figures.moved != args.items:
            print(f"[{figures.database}] WARNING: the tick moved {figures.moved} of "
                  f"{args.items} items; the figures are not comparable", flush=True)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
