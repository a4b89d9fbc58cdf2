"""Pytest plugin for the sandbox gateway (loaded by ``tests/conftest.py``; product code never
imports this module, it needs pytest).

``sandbox`` starts a fresh gateway on a free loopback port for one test and stops it after.
Its ``.settings`` are the facade's configuration keys pointing at it, so a facade test reads
``RatepaySettings.from_mapping(sandbox.settings)`` and talks real HTTP to it. The request helpers
below build RatePAY requests by hand, for tests that talk to the sandbox without the facade.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from lxml import etree

from ratepay_oms.ratepay.xml import RATEPAY_NS, format_amount, q
from ratepay_oms.sandbox.running import (
    SANDBOX_SHOP_ID,
    SANDBOX_SYSTEM_ID,
    RunningSandbox,
    start_sandbox,
)

__all__ = [
    "SANDBOX_SHOP_ID",
    "SANDBOX_SYSTEM_ID",
    "RunningSandbox",
    "basket_xml",
    "customer_xml",
    "payment_xml",
    "request_xml",
    "sandbox",
    "start_sandbox",
]


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    """A running sandbox gateway for one test (seeded, so ids repeat from run to run)."""
    running = start_sandbox()
    try:
        yield running
    finally:
        running.stop()


# --------------------------------------------------------------------------- request helpers
# Hand-built RatePAY requests for tests that talk to the sandbox without the facade.

Item = tuple[str, int, str] | tuple[str, int, str, str]
"""(article-number, quantity, unit-price-gross[, discount]) — tax rate is always 19."""


def _e(tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    el = etree.Element(q(tag), nsmap={None: RATEPAY_NS})
    for key, value in attrs.items():
        el.set(key.replace("_", "-"), value)
    if text is not None:
        el.text = text
    return el


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    el = _e(tag, text, **attrs)
    parent.append(el)
    return el


def basket_xml(
    items: list[Item] = (),  # type: ignore[assignment]
    *,
    shipping: str | None = None,
    discount: str | None = None,
    amount: str | None = None,
    currency: str = "EUR",
) -> etree._Element:
    """A ``shopping-basket``; ``amount`` defaults to the protocol sum of the positions."""
    total = Decimal("0")
    basket = _e("shopping-basket")
    box = _sub(basket, "items")
    for item in items:
        article, qty, price, *rest = item
        attrs = {
            "article-number": article,
            "quantity": str(qty),
            "unit-price-gross": price,
            "tax-rate": "19",
        }
        if rest:
            attrs["discount"] = rest[0]
        el = _sub(box, "item", f"Article {article}")
        for k, v in attrs.items():
            el.set(k, v)
        total += (Decimal(price) + Decimal(rest[0] if rest else "0")) * qty
    for kind, value in (("shipping", shipping), ("discount", discount)):
        if value is not None:
            el = _sub(basket, kind, kind.title())
            el.set("unit-price-gross", value)
            el.set("tax-rate", "19")
            total += Decimal(value)
    basket.set("amount", amount if amount is not None else format_amount(total))
    basket.set("currency", currency)
    return basket


def customer_xml(last_name: str = "Beispiel", *, drop: tuple[str, ...] = ()) -> etree._Element:
    """A complete B2C customer; ``drop`` removes top-level children by tag name."""
    c = _e("customer")
    for tag, text in (
        ("first-name", "Erika"),
        ("last-name", last_name),
        ("gender", "F"),
        ("date-of-birth", "1985-04-12"),
        ("ip-address", "203.0.113.17"),
    ):
        _sub(c, tag, text)
    contacts = _sub(c, "contacts")
    _sub(contacts, "email", "erika@example.org")
    _sub(_sub(contacts, "phone"), "direct-dial", "030 1234567")
    address = _sub(_sub(c, "addresses"), "address", type="BILLING")
    for tag, text in (
        ("street", "Musterweg"),
        ("street-number", "7a"),
        ("zip-code", "10115"),
        ("city", "Berlin"),
        ("country-code", "DE"),
    ):
        _sub(address, tag, text)
    _sub(c, "customer-allow-credit-inquiry", "yes")
    for tag in drop:
        for el in c.findall(q(tag)):
            c.remove(el)
    return c


def payment_xml(amount: str, method: str = "INVOICE") -> etree._Element:
    p = _e("payment", method=method, currency="EUR")
    _sub(p, "amount", amount)
    return p


def request_xml(
    operation: str,
    settings: dict[str, str],
    *,
    transaction_id: str | None = None,
    subtype: str | None = None,
    content: list[etree._Element] | None = None,
    order_id: str | None = None,
    credential: bool = True,
) -> bytes:
    """One request document with the sandbox's credentials from ``settings``."""
    root = _e("request", version="1.0")
    head = _sub(root, "head")
    _sub(head, "system-id", settings.get("SYSTEM_ID", SANDBOX_SYSTEM_ID))
    if transaction_id:
        _sub(head, "transaction-id", transaction_id)
    op = _sub(head, "operation", operation)
    if subtype:
        op.set("subtype", subtype)
    if credential:
        cred = _sub(head, "credential")
        _sub(cred, "profile-id", settings["PROFILE_ID"])
        _sub(cred, "securitycode", settings["SECURITY_CODE"])
    if order_id:
        _sub(_sub(head, "external"), "order-id", order_id)
    systems = _sub(_sub(head, "meta"), "systems")
    _sub(systems, "system", name="ratepay-oms-tests", version="0")
    _sub(systems, "api-version", "1.8")
    if content is not None:
        box = _sub(root, "content")
        for el in content:
            box.append(el)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")
