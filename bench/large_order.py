"""Large-order benchmark: one order of 10,000 units, placed, shown and shipped.

Not a test: it prints figures and never asserts timing. For each database (``--db``,
repeatable: ``sqlite`` or a server URL on which a throw-away database is created and dropped;
default ``sqlite``) it starts the sandbox gateway on loopback (answers at zero delay) and
measures, in the same run:

- **floor (place)**: the set-based writes placing stores, done by hand on the project's
  schema: the order row, ``--units`` item rows in one Core executemany, their history rows
  by one ``INSERT … SELECT`` per 1,000 ids, one commit. No engine, no gateway: what placing
  costs at the least.
- **place (Engine.place_order)**: the order through the authorisation flow to where it
  rests (``ready for shipment``: PAYMENT_INIT, PAYMENT_REQUEST, PAYMENT_CONFIRM).
- **place (CLI)**: ``ratepay-oms order place FILE`` of a second such order, in process
  (click's runner), with its output's line count (a summary, not a row per unit).
- **show**: ``order show REF`` (summary), ``--items`` (every item) and ``--json``.
- **floor (ship)**: as many set-based moves (UPDATE, history and transition-log rows by
  ``INSERT … SELECT``) of all units as ``ship`` makes per unit, by hand.
- **event ship (CLI)** and **Engine.trigger("ship")**: CONFIRMATION_DELIVER of every unit.

Each figure is wall time; "gateway" is the time the calls of that step spent at the gateway
(the API log's ``duration_ms``: request out to answer in, sandbox work included), "engine" is
wall minus gateway, and "x" its ratio to the floor of the same kind (and CPU's to the floor's
CPU). CPU (this
process, sandbox threads included) is printed too: the machine may be shared, and CPU time
moves less with other people's load than wall time does.

    python bench/large_order.py
    python bench/large_order.py --units 10000 --db sqlite --db postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.tick import throwaway_database  # noqa: E402

SKUS = (
    # sku, name, share of the units, unit price, tax rate, per-unit discount. The basket stays
    # under the sandbox's risk limit (5,000.00) so the order is authorised, not declined.
    ("SKU-100", "Mug", Decimal("0.5"), "0.30", "19", None),
    ("SKU-200", "Tea pot", Decimal("0.4"), "0.40", "19", "-0.05"),
    ("SKU-300", "Cup", Decimal("0.1"), "1.33", "7", None),
)


def big_order(ref: str, units: int) -> dict[str, Any]:
    """The example order with ``units`` units over three SKUs."""
    from ratepay_oms.demo import example_order

    doc = copy.deepcopy(example_order(ref))
    lines = []
    left = units
    for index, (sku, name, share, price, tax, discount) in enumerate(SKUS):
        quantity = left if index == len(SKUS) - 1 else int(units * share)
        left -= quantity
        line = {"sku": sku, "name": name, "quantity": quantity, "unit_price_gross": price,
                "tax_rate": tax}
        if discount is not None:
            line["discount"] = discount
        lines.append(line)
    doc["items"] = lines
    return doc


@dataclass
class Figure:
    label: str
    wall: float
    cpu: float
    gateway: float | None = None
    floor: float | None = None
    note: str = ""
    floor_cpu: float | None = None

    def row(self) -> str:
        gateway = f"{self.gateway:6.2f}" if self.gateway is not None else "     -"
        engine = self.wall - (self.gateway or 0.0)
        ratio = f"x{engine / self.floor:5.1f}" if self.floor else "     -"
        if self.floor_cpu:
            ratio += f" x{self.cpu / self.floor_cpu:5.1f} cpu"
        else:
            ratio += " " * 10
        return (f"  {self.label:<36} {self.wall:7.2f} s {self.cpu:7.2f} s {gateway} s "
                f"{engine:7.2f} s {ratio}  {self.note}")


def measure(func: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = func()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def gateway_seconds(engine: Any, order_ref: str, after_id: int) -> tuple[float, int, int]:
    """Seconds the order's calls logged after ``after_id`` spent at the gateway, how many
    calls, and the newest log id."""
    import sqlalchemy as sa

    from ratepay_oms.persistence.api_log import ApiLogEntry

    with engine.session() as session:
        rows = session.execute(
            sa.select(ApiLogEntry.id, ApiLogEntry.duration_ms).where(
                ApiLogEntry.order_ref == order_ref, ApiLogEntry.id > after_id
            )
        ).all()
        newest = session.scalar(sa.select(sa.func.max(ApiLogEntry.id))) or 0
    return sum((ms or 0) for _, ms in rows) / 1000, len(rows), newest


def floor_place(engine: Any, units: int, now: datetime) -> None:
    """The set-based writes of placing (see the module docstring), timed."""
    import sqlalchemy as sa

    from ratepay_oms.persistence.models import Order, OrderItem, StateHistory

    items = OrderItem.__table__
    history = StateHistory.__table__
    with engine.db.begin() as conn:
        order_id = conn.execute(
            sa.insert(Order.__table__).values(
                order_ref="FLOOR", process="RatepayInvoice01", currency="EUR",
                customer_ref="C-1", data="{}", goods_total=Decimal("1.00"), created_at=now,
            )
        ).inserted_primary_key[0]
        rows = []
        for line_no, (sku, name, share, price, tax, discount) in enumerate(SKUS):
            unit = {"order_id": order_id, "line_no": line_no, "sku": sku, "name": name,
                    "unit_price_gross": Decimal(price), "tax_rate": Decimal(tax),
                    "discount": Decimal(discount or "0"), "process": "RatepayInvoice01",
                    "state": "new", "state_entered_at": now, "attempts": 0}
            rows.extend([unit] * int(units * share))
        conn.execute(sa.insert(items), rows)
        ids = [i for (i,) in conn.execute(
            sa.select(items.c.id).where(items.c.order_id == order_id).order_by(items.c.id))]
        for part in range(0, len(ids), 1000):
            chunk = ids[part:part + 1000]
            conn.execute(sa.insert(history).from_select(
                ["item_id", "order_id", "from_state", "to_state", "event", "created_at"],
                sa.select(items.c.id, items.c.order_id, sa.null(), sa.literal("new"), sa.null(),
                          sa.literal(now, history.c.created_at.type))
                .where(items.c.id.in_(chunk))))


def floor_moves(engine: Any, moves: int, now: datetime) -> None:
    """``moves`` set-based moves of every unit of the floor order: the UPDATE, history and
    transition-log rows of each by ``INSERT … SELECT`` per 1,000 ids, one transaction."""
    import sqlalchemy as sa

    from ratepay_oms.persistence.models import Order, OrderItem, StateHistory, TransitionLog

    items = OrderItem.__table__
    history = StateHistory.__table__
    log = TransitionLog.__table__
    with engine.db.begin() as conn:
        order_id = conn.scalar(sa.select(Order.id).where(Order.order_ref == "FLOOR"))
        ids = [i for (i,) in conn.execute(
            sa.select(items.c.id).where(items.c.order_id == order_id).order_by(items.c.id))]
        for step in range(moves):
            source, target = f"s{step}", f"s{step + 1}"
            for part in range(0, len(ids), 1000):
                chunk = ids[part:part + 1000]
                conn.execute(sa.update(items).where(items.c.id.in_(chunk))
                             .values(state=target, state_entered_at=now))
                conn.execute(sa.insert(history).from_select(
                    ["item_id", "order_id", "from_state", "to_state", "event", "created_at"],
                    sa.select(items.c.id, items.c.order_id, sa.literal(source),
                              sa.literal(target), sa.literal("ship"),
                              sa.literal(now, history.c.created_at.type))
                    .where(items.c.id.in_(chunk))))
                conn.execute(sa.insert(log).from_select(
                    ["item_id", "order_id", "process", "event", "source_state", "target_state",
                     "is_error", "created_at"],
                    sa.select(items.c.id, items.c.order_id, sa.literal("RatepayInvoice01"),
                              sa.literal("ship"), sa.literal(source), sa.literal(target),
                              sa.literal(False), sa.literal(now, log.c.created_at.type))
                    .where(items.c.id.in_(chunk))))


def cli(args: list[str]) -> tuple[int, str]:
    from click.testing import CliRunner

    from ratepay_oms.cli import cli as command

    result = CliRunner().invoke(command, args, catch_exceptions=False)
    return result.exit_code, result.output


def bench(url: str, db: str, units: int, tmp: Path) -> list[Figure]:
    from ratepay_oms.demo import demo_engine
    from ratepay_oms.sandbox.running import start_sandbox

    sandbox = start_sandbox()
    engine = demo_engine(url, sandbox.settings)
    # The CLI finds the gateway through the environment, as an operator's shell would.
    env_before = dict(os.environ)
    os.environ.update({f"RATEPAY_{k}": v for k, v in sandbox.settings.items()})
    os.environ["RATEPAY_OMS_DATABASE_URL"] = url
    figures: list[Figure] = []
    try:
        now = datetime.now(UTC).replace(tzinfo=None)
        _, floor, floor_cpu = measure(lambda: floor_place(engine, units, now))
        figures.append(Figure("floor: set-based insert + history", floor, floor_cpu,
                              note="baseline"))
        _, _, last = gateway_seconds(engine, "-", 0)

        view, wall, cpu = measure(lambda: engine.place_order(big_order("BIG-A", units)))
        gateway, calls, last = gateway_seconds(engine, "BIG-A", last)
        states = sorted(set(view.states()))
        figures.append(Figure("place: Engine.place_order", wall, cpu, gateway, floor,
                              f"{calls} calls; items now in {states}", floor_cpu))

        path = tmp / "big-b.json"
        path.write_text(json.dumps(big_order("BIG-B", units)), encoding="utf-8")
        (code, out), wall, cpu = measure(lambda: cli(["order", "place", str(path)]))
        gateway, calls, last = gateway_seconds(engine, "BIG-B", last)
        figures.append(Figure("place: CLI order place", wall, cpu, gateway, floor,
                              f"exit {code}, {len(out.splitlines())} lines of output",
                              floor_cpu))

        for label, extra in (("show: CLI order show (summary)", []),
                             ("show: CLI order show --items", ["--items"]),
                             ("show: CLI order show --json", ["--json"])):
            (code, out), wall, cpu = measure(lambda extra=extra: cli(
                ["order", "show", "BIG-A", *extra]))
            figures.append(Figure(label, wall, cpu,
                                  note=f"exit {code}, {len(out.splitlines())} lines, "
                                       f"{len(out) // 1024} KiB"))

        result, wall, cpu = measure(lambda: engine.trigger("ship", "BIG-A"))
        gateway, calls, last = gateway_seconds(engine, "BIG-A", last)
        per_unit = max(1, round(len(result.moved) / units))
        _, ship_floor, ship_floor_cpu = measure(lambda: floor_moves(engine, per_unit, now))
        figures.append(Figure(f"floor: {per_unit} set-based moves of all units",
                              ship_floor, ship_floor_cpu, note="baseline"))
        figures.append(Figure("ship: Engine.trigger('ship')", wall, cpu, gateway, ship_floor,
                              f"{calls} call(s), {len(result.moved)} moves", ship_floor_cpu))
        (code, out), wall, cpu = measure(lambda: cli(["event", "ship", "BIG-B"]))
        gateway, calls, last = gateway_seconds(engine, "BIG-B", last)
        figures.append(Figure("ship: CLI event ship", wall, cpu, gateway, ship_floor,
                              f"exit {code}, {calls} call(s), {len(out.splitlines())} lines",
                              ship_floor_cpu))
    finally:
        os.environ.clear()
        os.environ.update(env_before)
        engine.close()
        sandbox.stop()
    print(f"[{db}] {units} units over {len(SKUS)} SKUs")
    print(f"  {'step':<36} {'wall':>9} {'cpu':>9} {'gateway':>8} {'engine':>9} "
          f"{'engine/floor, cpu/floor cpu':<17}  note")
    for figure in figures:
        print(figure.row())
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--db", action="append", default=None,
                        help="sqlite (default) or a server URL; repeatable")
    args = parser.parse_args(argv)
    print(f"command: python bench/large_order.py {' '.join(sys.argv[1:])}")
    print(f"load: {os.getloadavg()}")
    for spec in args.db or ["sqlite"]:
        name = "sqlite" if spec == "sqlite" else spec.split("+")[0].split(":")[0]
        with (tempfile.TemporaryDirectory(prefix="rpoms_large_") as tmp,
              throwaway_database(spec) as url):
            bench(url, name, args.units, Path(tmp))


if __name__ == "__main__":
    main()
