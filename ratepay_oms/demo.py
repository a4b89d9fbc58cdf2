"""``ratepay-oms demo``: every RatePAY flow end to end against the in-process sandbox.

It needs no configuration: a SQLite database in a temporary directory (or ``--db``), the
sandbox gateway on a free loopback port, example orders for every payment method, and the
flows a shop lives with — payment, cancellation, partial cancellation, refund, partial refund,
partial shipment, a decline, and the reference's worked example 100045 — driven by manual
events and ticks. Each flow states where every item must end; the demo exits non-zero when
one does not, so it doubles as a smoke test of the whole product.

The helpers here (``example_order``, ``attach_ratepay``) are also what the flow tests use.
"""

from __future__ import annotations

import copy
import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ratepay_oms.errors import OmsError
from ratepay_oms.plugins.ratepay.services import build_facade, facade_services
from ratepay_oms.ratepay import RatepayFacade, RatepaySettings

log = logging.getLogger(__name__)

PROCESS_FOR_METHOD = {
    "INVOICE": "RatepayInvoice01",
    "ELV": "RatepayElv01",
    "PREPAYMENT": "RatepayPrepayment01",
    "INSTALLMENT": "RatepayInstallment01",
}

_EXAMPLE: dict[str, Any] = {
    "order_ref": "100045",
    "process": "RatepayInvoice01",
    "currency": "EUR",
    "customer": {
        "customer_ref": "C-3001",
        "first_name": "Erika",
        "last_name": "Mustermann",
        "gender": "F",
        "date_of_birth": "1974-08-12",
        "email": "erika.mustermann@example.org",
        "phone": "030 1234567",
        "ip_address": "203.0.113.7",
        "language": "de",
        "billing_address": {
            "street": "Heidestraße 17",
            "zip_code": "51147",
            "city": "Köln",
            "country_code": "DE",
        },
    },
    "items": [
        {"sku": "SKU-100", "name": 'Mug "Kaffee & Kuchen"', "quantity": 3,
         "unit_price_gross": "12.50", "tax_rate": "19"},
        {"sku": "SKU-200", "name": "Tea pot", "quantity": 1, "unit_price_gross": "49.90",
         "tax_rate": "19", "discount": "-4.90"},
    ],
    "shipping": {"name": "Standard shipping", "unit_price_gross": "4.95", "tax_rate": "19"},
    "discount": {"name": "Voucher WELCOME5", "unit_price_gross": "-5.00", "tax_rate": "19"},
    "payment": {"method": "INVOICE"},
    "device_token": "b2f1c6a0d7e94d1e8f3a2c5b6d7e8f90",
}
"""The shared example order (``examples/order-invoice.json``): the reference's order 100045."""


def example_order(
    order_ref: str, method: str = "INVOICE", *, last_name: str | None = None
) -> dict[str, Any]:
    """The example order under another reference and payment method (ELV gets a bank
    account, INSTALLMENT a 12-month plan); ``last_name="Ablehnung"`` makes the sandbox
    decline it."""
    order = copy.deepcopy(_EXAMPLE)
    order["order_ref"] = order_ref
    order["process"] = PROCESS_FOR_METHOD[method]
    order["payment"] = {"method": method}
    if method == "ELV":
        order["customer"]["bank_account"] = {
            "owner": "Erika Mustermann",
            "iban": "DE02120300000000202051",
        }
    if method == "INSTALLMENT":
        # RatePAY finances from 200.00 on (the sandbox profile's minimum): add a bigger line.
        order["items"].append(
            {"sku": "SKU-300", "name": "Espresso machine", "quantity": 1,
             "unit_price_gross": "249.00", "tax_rate": "19"}
        )
        order["payment"]["installment"] = {
            "calculation_type": "calculation-by-time",
            "value": "12",
            "payment_firstday": 28,
            "debit_pay_type": "BANK-TRANSFER",
        }
    if last_name is not None:
        order["customer"]["last_name"] = last_name
    return order


def attach_ratepay(engine: Any, settings: RatepaySettings | dict[str, str]) -> RatepayFacade:
    """Give ``engine`` a RatePAY facade on ``settings`` whose API log goes to its database."""
    if isinstance(settings, dict):
        settings = RatepaySettings.from_mapping(settings)
    facade = build_facade(settings, engine.session)
    engine.services.update(facade_services(facade))
    return facade


def demo_engine(db_url: str, settings: RatepaySettings | dict[str, str]) -> Any:
    """An ``Engine`` on ``db_url`` (schema upgraded) with the shipped processes and a RatePAY
    facade on ``settings``: what the demo and the flow tests run against."""
    from ratepay_oms.config import OmsConfig
    from ratepay_oms.engine.engine import Engine
    from ratepay_oms.process.loader import default_process_dir

    if isinstance(settings, dict):
        settings = RatepaySettings.from_mapping(settings)
    # No config file and the sandbox's settings, whatever RATEPAY_* the shell has exported.
    engine = Engine(
        db_url, process_dir=default_process_dir(), config=OmsConfig(), ratepay_settings=settings
    )
    engine.upgrade_db()
    return engine


def sent_basket(request_xml: bytes) -> dict[str, Any] | None:
    """What a request's ``shopping-basket`` said: amount, items as (key, quantity, unit price,
    discount) and the shipping / discount amounts (``None`` when not sent); ``None`` when the
    request had no basket. Used to show and to check what reached the gateway."""
    from ratepay_oms.ratepay.xml import RATEPAY_NS, parse_xml

    root = parse_xml(request_xml)
    ns = {"r": RATEPAY_NS}
    basket = root.find(".//r:shopping-basket", ns)
    if basket is None:
        return None
    items = []
    for item in basket.findall("r:items/r:item", ns):
        key = item.get("article-number", "")
        if item.get("unique-article-number"):
            key += "/" + item.get("unique-article-number", "")
        items.append(
            (key, int(item.get("quantity", "0")), Decimal(item.get("unit-price-gross", "0")),
             Decimal(item.get("discount", "0")))
        )
    special = {}
    for tag in ("shipping", "discount"):
        el = basket.find(f"r:{tag}", ns)
        special[tag] = None if el is None else Decimal(el.get("unit-price-gross", "0"))
    return {"amount": Decimal(basket.get("amount", "0")), "items": items, **special}


# --- the flows ------------------------------------------------------------------------------


@dataclass
class Call:
    """One gateway call as the demo reports it (from the sandbox's received list)."""

    order_ref: str
    operation: str
    subtype: str | None
    amount: str
    result: str


@dataclass
class DemoRun:
    engine: Any
    gateway: Any
    console: Console
    now: datetime
    expected: dict[int, str] = field(default_factory=dict)
    item_orders: dict[int, str] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    _seen: int = 0

    # -- steps -----------------------------------------------------------------------------

    def place(self, order: dict[str, Any]) -> list[int]:
        view = self.engine.place_order(order, now=self.now)
        ids = [i.id for i in view.items]
        for i in ids:
            self.item_orders[i] = order["order_ref"]
        self._say(f"place order {order['order_ref']} ({order['payment']['method']})", view)
        return ids

    def event(self, event: str, order_ref: str, ids: Sequence[int] | None = None) -> None:
        result = self.engine.trigger(event, order_ref, ids, now=self.now)
        which = "all items" if ids is None else "items " + ", ".join(map(str, ids))
        self._say(f"{event!r} on {which} of {order_ref}", self.engine.order(order_ref))
        for error in result.errors:
            self.console.print(f"    [red]error:[/red] {error}")

    def expect(self, ids: Sequence[int], state: str) -> None:
        for i in ids:
            self.expected[i] = state

    def _say(self, what: str, view: Any) -> None:
        self.console.print(f"  [bold]{what}[/bold]")
        for call in self._new_calls():
            self.console.print(
                f"    → {call.operation}{'/' + call.subtype if call.subtype else ''}"
                f"  amount {call.amount or '-'}  result {call.result}"
            )
        states: dict[str, list[str]] = {}
        for item in view.items:
            states.setdefault(item.state, []).append(f"{item.id} {item.sku}")
        for state, items in states.items():
            self.console.print(f"    [cyan]{state}[/cyan]: {', '.join(items)}")

    def _new_calls(self) -> list[Call]:
        received = self.gateway.received[self._seen :]
        self._seen += len(received)
        new = calls_of(received)
        self.calls.extend(new)
        return new


def calls_of(exchanges: Sequence[Any]) -> list[Call]:
    """The sandbox's received exchanges as ``Call`` rows (order, operation, amount, result)."""
    calls = []
    for ex in exchanges:
        request = ex.request_xml.decode("utf-8", "replace")
        response = (ex.response_xml or b"").decode("utf-8", "replace")
        ref = re.search(r"<order-id>([^<]*)</order-id>", request)
        basket = sent_basket(ex.request_xml)
        amount = re.search(r"<amount>([^<]+)</amount>", request)
        result = re.search(r'<result code="(\d+)"', response)
        calls.append(
            Call(
                order_ref=ref.group(1) if ref else "",
                operation=ex.operation or "?",
                subtype=ex.subtype,
                amount=str(basket["amount"]) if basket else (amount.group(1) if amount else ""),
                result=result.group(1) if result else f"HTTP {ex.http_status}",
            )
        )
    return calls


def _flow_payment(run: DemoRun) -> None:
    ids = run.place(example_order("DEMO-PAY", "INVOICE"))
    run.event("ship", "DEMO-PAY")
    run.expect(ids, "ready for refund")


def _flow_cancellation(run: DemoRun) -> None:
    ids = run.place(example_order("DEMO-CANCEL", "ELV"))
    run.event("cancel", "DEMO-CANCEL")
    run.expect(ids, "cancelled")


def _flow_partial_cancellation(run: DemoRun) -> None:
    ids = run.place(example_order("DEMO-PCANCEL", "PREPAYMENT"))
    run.event("create payment confirmation", "DEMO-PCANCEL")  # the money has arrived
    run.event("cancel", "DEMO-PCANCEL", ids[:1])
    run.event("ship", "DEMO-PCANCEL")
    run.expect(ids[:1], "cancelled")
    run.expect(ids[1:], "ready for refund")


def _flow_refund(run: DemoRun) -> None:
    ids = run.place(example_order("DEMO-REFUND", "INSTALLMENT"))
    run.event("ship", "DEMO-REFUND")
    run.event("refund payment", "DEMO-REFUND")
    run.expect(ids, "completed")


def _flow_partial_refund(run: DemoRun) -> None:
    ids = run.place(example_order("DEMO-PREFUND", "INVOICE"))
    run.event("ship", "DEMO-PREFUND")
    run.event("refund payment", "DEMO-PREFUND", ids[3:])
    run.expect(ids[:3], "ready for refund")
    run.expect(ids[3:], "completed")


def _flow_partial_shipment(run: DemoRun) -> None:
    ids = run.place(example_order("DEMO-PSHIP", "ELV"))
    run.event("ship", "DEMO-PSHIP", ids[:2])
    run.event("ship", "DEMO-PSHIP", ids[2:])
    run.expect(ids, "ready for refund")


def _flow_decline(run: DemoRun) -> None:
    ids = run.place(example_order("DEMO-DECLINE", "INVOICE", last_name="Ablehnung"))
    run.expect(ids, "payment request declined")


def _flow_worked_example(run: DemoRun) -> None:
    ids = run.place(example_order("100045", "INVOICE"))
    mugs, pot = ids[:3], ids[3]
    run.event("ship", "100045", mugs[:2])
    run.event("cancel", "100045", mugs[2:])
    run.event("ship", "100045", [pot])
    run.event("refund payment", "100045", mugs[:1])
    run.expect(mugs[:1], "completed")
    run.expect(mugs[1:2], "ready for refund")
    run.expect(mugs[2:], "cancelled")
    run.expect([pot], "ready for refund")


FLOWS: list[tuple[str, Callable[[DemoRun], None]]] = [
    ("Payment (invoice): ship everything", _flow_payment),
    ("Cancellation (direct debit): cancel everything", _flow_cancellation),
    ("Partial cancellation (prepayment): money arrives, cancel one mug, ship the rest",
     _flow_partial_cancellation),
    ("Refund (installment): ship everything, everything comes back", _flow_refund),
    ("Partial refund (invoice): the tea pot comes back", _flow_partial_refund),
    ("Partial shipment (direct debit): two parcels", _flow_partial_shipment),
    ("Decline (invoice, customer 'Ablehnung')", _flow_decline),
    ("Worked example 100045: ship 2 mugs, cancel 1, ship tea pot, return 1 mug",
     _flow_worked_example),
]


def run_demo(db_url: str | None = None, console: Console | None = None) -> int:
    """Run every flow; 0 when every item ended where it should, 1 otherwise."""
    from ratepay_oms.sandbox.running import start_sandbox

    console = console or Console(highlight=False)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if db_url is None:
        tmp = tempfile.TemporaryDirectory(prefix="ratepay-oms-demo-")
        db_url = f"sqlite:///{Path(tmp.name) / 'demo.sqlite'}"
    sandbox = start_sandbox()
    engine = None
    try:
        engine = demo_engine(db_url, sandbox.settings)
        console.print(f"[bold]ratepay-oms demo[/bold]  database {db_url}")
        console.print(f"sandbox gateway {sandbox.url}\n")
        now = datetime.now(UTC).replace(tzinfo=None)
        run = DemoRun(engine, sandbox.gateway, console, now)
        broken = 0
        for title, flow in FLOWS:
            console.rule(title)
            try:
                flow(run)
            except OmsError as exc:
                broken += 1
                console.print(f"  [red]flow stopped:[/red] {exc}")
        console.rule("90 days later: the tick completes what nobody returned")
        later = now + timedelta(days=91)
        result = engine.tick(now=later)
        console.print(f"  tick: {result.summary() if hasattr(result, 'summary') else result}")
        for item_id, state in run.expected.items():
            if state == "ready for refund":
                run.expected[item_id] = "completed"
        return max(_report(run), 1 if broken else 0)
    finally:
        if engine is not None:
            engine.close()
        sandbox.stop()
        if tmp is not None:
            tmp.cleanup()


def _report(run: DemoRun) -> int:
    states = Table(title="Items")
    for col in ("order", "item", "sku", "state", "expected", ""):
        states.add_column(col)
    failures = 0
    for ref in dict.fromkeys(run.item_orders.values()):
        for item in run.engine.order(ref).items:
            want = run.expected.get(item.id, "?")
            ok = item.state == want
            failures += not ok
            states.add_row(
                ref, str(item.id), item.sku, item.state, want,
                "[green]ok[/green]" if ok else "[red]WRONG[/red]",
            )
    calls = Table(title="Gateway calls")
    for col in ("order", "operation", "subtype", "amount", "result"):
        calls.add_column(col)
    for call in run.calls:
        calls.add_row(call.order_ref, call.operation, call.subtype or "", call.amount, call.result)
    run.console.print(states)
    run.console.print(calls)
    if failures:
        run.console.print(f"[red]{failures} item(s) did not end where they should[/red]")
        return 1
    run.console.print("[green]every flow ended where it should[/green]")
    return 0
