"""Web console benchmark: page load times at the sizes the issue names.

Not a test: it prints figures and never asserts timing. For each database it

1. seeds ``--orders`` orders of ``--items-per-order`` items each (default 100,000 × 10 =
   1,000,000 items) with set-based ``INSERT … SELECT`` statements (no per-row round trips;
   setup is not measured), spread over 100 days, items in a mix of states (one state rare);
2. places one real order of 1,000 items through the engine and the sandbox gateway (payment
   request and confirmation, so it has history and gateway calls);
3. runs ``ratepay-oms web serve`` (uvicorn) in its own process, logs in, and times ``GET`` of the
   orders list (first page, a deep page by cursor, filtered by a common state, a rare state,
   a process, a date range) and of the 1,000-item order page (median of ``--repeat`` loads,
   after one warm-up load);
4. baselines, measured in the same run: for the list, the bare indexed query a page needs
   (``SELECT … ORDER BY id DESC LIMIT 51``) and the same page by ``OFFSET`` at the depth of
   the deep page (what keyset paging avoids); for the order page, ``order_detail()`` (the data
   ``order show --json`` reads: the floor any page showing the order pays).

    python bench/web.py                      # SQLite, and PostgreSQL when it answers
    python bench/web.py --db sqlite --orders 10000
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from tick import DEFAULT_PG, server_answers, throwaway_database  # noqa: E402

PASSWORD = "bench password 1"
STATES = ("ready for shipment", "ready for refund", "completed", "cancelled")
RARE_STATE = "delivery invalid"
"""One item in 10,000 sits here: a state filter that must not read every order."""


def seed(url: str, orders: int, per_order: int, now: datetime) -> None:
    """``orders`` orders and ``orders * per_order`` items, set-based (two statements)."""
    engine = sa.create_engine(url)
    backend = engine.dialect.name
    if backend == "postgresql":
        numbers = "SELECT generate_series(1, :n) AS i"
        created = (
            "CAST(:start AS timestamp) "
            "+ make_interval(secs => (CAST(n.i AS bigint) * 8640000 / :n))"
        )
    else:
        numbers = (
            "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < :n) "
            "SELECT i FROM seq"
        )
        created = (
            "datetime(:start, '+' || (n.i * 8640000 / :n) || ' seconds')"
            if backend == "sqlite"
            else "DATE_ADD(:start, INTERVAL (n.i * 8640000 DIV :n) SECOND)"
        )
    concat = (lambda a, b: f"CONCAT({a}, {b})") if backend == "mysql" else (
        lambda a, b: f"{a} || {b}")
    state = (
        "CASE WHEN (o.id * 10 + k.k) % 10000 = 0 THEN :rare "
        "WHEN (o.id + k.k) % 4 = 0 THEN :s0 WHEN (o.id + k.k) % 4 = 1 THEN :s1 "
        "WHEN (o.id + k.k) % 4 = 2 THEN :s2 ELSE :s3 END"
    )
    BENCH, SKU = "'BENCH-'", "'SKU-'"
    k_rows = " UNION ALL ".join(f"SELECT {k} AS k" for k in range(per_order))
    params = {"n": orders, "start": now - timedelta(days=100), "rare": RARE_STATE,
              **{f"s{i}": s for i, s in enumerate(STATES)}}
    with engine.begin() as conn:
        if backend == "mysql":
            conn.execute(sa.text("SET SESSION max_recursive_iterations = 100000000"))
        conn.execute(
            sa.text(
                "INSERT INTO oms_order (order_ref, process, currency, customer_ref, data, "
                f"goods_total, created_at) SELECT {concat(BENCH, 'n.i')}, "
                f"'RatepayInvoice01', 'EUR', 'C-1', '{{}}', 10.00, {created} FROM ({numbers}) n"
            ),
            params,
        )
        conn.execute(
            sa.text(
                "INSERT INTO oms_order_item (order_id, line_no, sku, name, unit_price_gross, "
                "tax_rate, discount, process, state, state_entered_at, attempts) "
                f"SELECT o.id, k.k, {concat(SKU, 'k.k')}, 'Bench item', 1.00, 19, 0, "
                f"o.process, {state}, o.created_at, 0 FROM oms_order o CROSS JOIN ({k_rows}) k"
            ),
            params,
        )
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            sa.text("ANALYZE TABLE oms_order, oms_order_item" if backend == "mysql" else "ANALYZE")
        )
    engine.dispose()


def big_order(ref: str, items: int) -> dict[str, Any]:
    from ratepay_oms.demo import example_order

    order = example_order(ref)
    order["items"] = [
        {"sku": f"SKU-{line}", "name": f"Article {line}", "quantity": items // 10,
         "unit_price_gross": "1.00", "tax_rate": "19"}
        for line in range(10)
    ]
    order.pop("discount", None)
    return order


@contextmanager
def serving(url: str) -> Iterator[str]:
    """``ratepay-oms web serve`` on ``url`` in a process of its own (as in production: the
    client's threads and the timings here do not share its interpreter)."""
    import requests

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ratepay_oms.cli import main; sys.exit(main())",
         "web", "serve", "--db", url, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(base + "/login", timeout=5)
                break
            except requests.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ratepay-oms web serve did not start") from None
                time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(20)


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up (caches, the drawing)
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def run(url: str, orders: int, per_order: int, order_items: int, repeat: int) -> list[str]:
    import requests

    from ratepay_oms.console.inspect import order_detail
    from ratepay_oms.demo import demo_engine
    from ratepay_oms.persistence.models import Order
    from ratepay_oms.sandbox.testing import start_sandbox
    from ratepay_oms.web.users import UserStore

    now = datetime.utcnow().replace(microsecond=0)
    sandbox = start_sandbox()
    engine = demo_engine(url, sandbox.settings)
    began = time.perf_counter()
    seed(url, orders, per_order, now)
    seeded = time.perf_counter() - began
    ref = "BIG-1000"
    engine.place_order(big_order(ref, order_items))
    UserStore(engine.session).add("bench", "viewer", PASSWORD)
    lines = [f"{engine.db.dialect.name}: seeded {orders:,} orders / {orders * per_order:,} "
             f"items in {seeded:.1f} s; order {ref} has {len(engine.order(ref).items)} items"]
    try:
        with serving(url) as base:
            http = requests.Session()
            page = http.get(base + "/login", timeout=30)
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
            http.post(base + "/login", timeout=30, data={
                "username": "bench", "password": PASSWORD, "csrf_token": token})

            def get(path: str, **params: str) -> Callable[[], Any]:
                def load() -> None:
                    answer = http.get(base + path, params=params, timeout=120)
                    assert answer.status_code == 200, answer.status_code
                return load

            with engine.session() as session:
                max_id = session.scalar(sa.select(sa.func.max(Order.id)))
            deep = max_id // 2
            day = (now - timedelta(days=50)).date().isoformat()
            list_rows = [
                ("orders list, first page", get("/orders")),
                (f"orders list, page at id {deep:,} (cursor)", get("/orders", before=str(deep))),
                ("orders list, state 'completed' (common)", get("/orders", state="completed")),
                (f"orders list, state '{RARE_STATE}' (rare)", get("/orders", state=RARE_STATE)),
                ("orders list, process RatepayInvoice01", get("/orders",
                                                               process="RatepayInvoice01")),
                (f"orders list, placed on {day}", get("/orders", **{"from": day, "to": day})),
            ]
            for label, load in list_rows:
                lines.append(f"  {label:<48} {median_ms(load, repeat):8.1f} ms")
            columns = (Order.id, Order.order_ref, Order.process, Order.currency,
                       Order.goods_total, Order.created_at)

            def bare() -> None:
                with engine.session() as session:
                    list(session.execute(sa.select(*columns).order_by(Order.id.desc()).limit(51)))

            def offset() -> None:
                with engine.session() as session:
                    list(session.execute(sa.select(*columns).order_by(Order.id.desc())
                                         .offset(max_id - deep).limit(51)))

            bare_ms = median_ms(bare, repeat)
            lines.append(f"  {'baseline: bare first-page query':<48} {bare_ms:8.1f} ms")
            offset_ms = median_ms(offset, repeat)
            lines.append(f"  {'baseline: same deep page by OFFSET (query only)':<48} "
                         f"{offset_ms:8.1f} ms")
            order_ms = median_ms(get(f"/orders/{ref}"), repeat)
            detail_ms = median_ms(lambda: order_detail(engine, ref), repeat)
            lines.append(f"  {'order page, 1,000 items':<48} {order_ms:8.1f} ms")
            lines.append(f"  {'baseline: order_detail() (order show data)':<48} "
                         f"{detail_ms:8.1f} ms  (page/baseline {order_ms / detail_ms:.1f}x)")
    finally:
        engine.close()
        sandbox.stop()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", action="append", help="sqlite or a server URL (repeatable)")
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--items-per-order", type=int, default=10)
    parser.add_argument("--order-items", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    targets = args.db or ["sqlite"] + ([DEFAULT_PG] if server_answers(DEFAULT_PG) else [])
    for target in targets:
        if target == "sqlite":
            with tempfile.TemporaryDirectory(prefix="rpoms-web-bench-") as folder:
                url = f"sqlite:///{Path(folder) / 'bench.sqlite'}"
                for line in run(url, args.orders, args.items_per_order, args.order_items,
                                args.repeat):
                    print(line, flush=True)
            continue
        with throwaway_database(target) as url:
            for line in run(url, args.orders, args.items_per_order, args.order_items,
                            args.repeat):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
