"""The RatePAY 1.8 protocol as the sandbox gateway speaks it: read, validate, dispatch, answer.

Checks run in the gateway's order (reference §2, §4, §11): operation (201/202), credential
(121/232, wrong ⇒ 120), subtype (214/234), transaction-id presence (206 / must-have), content
presence (208/209/233), then per-operation content (customer 216/220–227, basket 210/200,
payment 212/213/217/219/229/230/231), the profile's contract on a PAYMENT_REQUEST (basket
amount outside the method's limits ⇒ 2005/2006, deviating delivery address not allowed ⇒ 2001,
both ``ERROR`` / 150; company not allowed ⇒ 2002, a decline), the risk rules (703) and finally
the transaction and its ledger (unknown ⇒ 100, not accepted or ledger violation ⇒ 2300). Every
refusal is ``ERROR`` with result 150; declines are ``OK`` / 401 with a customer message. The
caller holds the gateway lock.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from lxml import etree
from lxml.builder import ElementMaker

from ratepay_oms.errors import OmsError
from ratepay_oms.ratepay import codes
from ratepay_oms.ratepay.codes import Operation
from ratepay_oms.ratepay.xml import RATEPAY_NS, format_amount, parse_amount, q, to_bytes
from ratepay_oms.sandbox import installments, ledger
from ratepay_oms.sandbox.ledger import BasketLine, LedgerRefusal, Transaction

if TYPE_CHECKING:
    from ratepay_oms.sandbox.gateway import SandboxConfig, SandboxGateway

logger = logging.getLogger(__name__)

E = ElementMaker(namespace=RATEPAY_NS, nsmap={None: RATEPAY_NS})
SHORT_ID = re.compile(r"([0-9a-zA-Z]{4}\.){3}[0-9a-zA-Z]{4}")

DECLINE_MESSAGES = {
    "de": (
        "Leider ist eine Bezahlung mit der gewählten Zahlart nicht möglich. Diese Entscheidung "
        "beruht auf einer automatisierten Datenverarbeitung."
    ),
    "en": (
        "Unfortunately, payment with the chosen method is not possible. This decision is based "
        "on automated data processing."
    ),
}
IDENTITY_MESSAGES = {
    "de": (
        "Leider konnten wir Ihre Identität nicht bestätigen. Bitte wählen Sie eine andere "
        "Zahlart."
    ),
    "en": "Unfortunately we could not confirm your identity. Please choose another payment method.",
}
"""The customer message of reason 730 (declined: buyer identity, sent with result 150)."""
ACCEPT_MESSAGES = {
    "de": "Die Prüfung war erfolgreich. Vielen Dank, dass Sie sich für Ratepay entschieden haben.",
    "en": "The verification was successful. Thank you for choosing Ratepay.",
}
PREFIXED_REASONS = frozenset({121, 209, 210, 214, 216})
"""Reason texts the gateway starts with the operation name (``PAYMENT_REQUEST request must …``)."""


@dataclass
class Answer:
    """What the gateway answers in ``head/processing`` plus the optional content."""

    status: str
    reason_code: int | None  # None: the element is left out (a FATAL answer)
    result_code: int | None
    response_type: str
    reason_text: str = ""
    result_text: str = ""
    customer_message: str | None = None
    content: etree._Element | None = None


class Refusal(Exception):
    """Stop processing and answer ERROR / ``reason`` / 150 (or the given status/result)."""

    def __init__(
        self,
        reason: int,
        detail: str = "",
        *,
        status: str = "ERROR",
        result: int = 150,
        customer_message: str | None = None,
    ) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.status = status
        self.result = result
        self.customer_message = customer_message


@dataclass
class Head:
    """The request head as far as it could be read."""

    system_id: str = ""
    operation: str | None = None
    subtype: str | None = None
    transaction_id: str | None = None
    short_id: str | None = None
    profile_id: str | None = None
    security_code: str | None = field(default=None, repr=False)
    has_credential: bool = False
    external: etree._Element | None = None
    content: etree._Element | None = None
    profile: SandboxConfig | None = field(default=None, repr=False)
    """The sandbox profile the credential names (set once the credential was checked)."""


def _text(parent: etree._Element | None, tag: str) -> str | None:
    if parent is None:
        return None
    el = parent.find(q(tag))
    if el is None or el.text is None:
        return None
    value = el.text.strip()
    return value or None


def read_head(root: etree._Element | None) -> Head:
    """Best-effort read of the head; never raises (faults must match unreadable requests too)."""
    head = Head()
    if root is None:
        return head
    h = root.find(q("head"))
    head.content = root.find(q("content"))
    if h is None:
        return head
    head.system_id = _text(h, "system-id") or ""
    op = h.find(q("operation"))
    if op is not None:
        head.operation = (op.text or "").strip() or None
        head.subtype = (op.get("subtype") or "").strip() or None
    head.transaction_id = _text(h, "transaction-id")
    head.short_id = _text(h, "transaction-short-id")
    cred = h.find(q("credential"))
    if cred is not None:
        head.has_credential = True
        head.profile_id = _text(cred, "profile-id")
        head.security_code = _text(cred, "securitycode")
    head.external = h.find(q("external"))
    return head


# --------------------------------------------------------------------------- responses


def build_response(head: Head, answer: Answer, tx: Transaction | None, now: datetime) -> bytes:
    """The response document: head echo, processing block, optional content."""
    h = E.head(E("system-id", head.system_id))
    if head.operation not in {o.value for o in codes.WITHOUT_TRANSACTION} - {"PAYMENT_INIT"}:
        tx_id = tx.transaction_id if tx is not None else head.transaction_id
        short = tx.short_id if tx is not None else head.short_id
        if tx_id:
            h.append(E("transaction-id", tx_id))
        if short:
            h.append(E("transaction-short-id", short))
    op = E.operation(head.operation or "")
    if head.subtype:
        op.set("subtype", head.subtype)
    h.append(op)
    h.append(E("response-type", answer.response_type))
    h.append(copy.deepcopy(head.external) if head.external is not None else E.external())
    processing = E.processing(
        E.timestamp(now.strftime("%Y-%m-%dT%H:%M:%S.000")),
        E.status(codes.STATUS_TEXTS.get(answer.status, answer.status), code=answer.status),
    )
    if answer.reason_code is not None:
        processing.append(E.reason(answer.reason_text, code=str(answer.reason_code)))
    if answer.result_code is not None:
        processing.append(E.result(answer.result_text, code=str(answer.result_code)))
    if answer.customer_message:
        processing.append(E("customer-message", answer.customer_message))
    h.append(processing)
    root = E.response(h, version="1.0")
    if answer.content is not None:
        root.append(answer.content)
    elif head.operation != Operation.PAYMENT_INIT:
        root.append(E.content())
    return to_bytes(root)


def refusal_answer(head: Head, refusal: Refusal) -> Answer:
    text = codes.reason_text(refusal.reason)
    if refusal.reason in PREFIXED_REASONS and head.operation:
        text = f"{head.operation} {text}"
    if refusal.detail:
        text = f"{text}: {refusal.detail}"
    return Answer(
        status=refusal.status,
        reason_code=refusal.reason,
        result_code=refusal.result,
        response_type=codes.RESPONSE_TYPE_ERROR,
        reason_text=text,
        result_text=codes.result_text(refusal.result),
        customer_message=refusal.customer_message,
    )


def success(
    op: Operation,
    content: etree._Element | None = None,
    *,
    reason: int | None = None,
    reason_text: str | None = None,
    result_text: str | None = None,
    customer_message: str | None = None,
) -> Answer:
    reason_code = codes.SUCCESS_REASON[op] if reason is None else reason
    result_code = codes.SUCCESS_RESULT[op]
    return Answer(
        status="OK",
        reason_code=reason_code,
        result_code=result_code,
        response_type=codes.RESPONSE_TYPE[op],
        reason_text=reason_text or codes.reason_text(reason_code),
        result_text=result_text or codes.result_text(result_code),
        customer_message=customer_message,
        content=content,
    )


def with_reason(answer: Answer, reason_code: int) -> Answer:
    """``answer`` with another reason (the ``reason_code`` fault): all else as processed."""
    return dataclasses.replace(
        answer, reason_code=reason_code, reason_text=codes.reason_text(reason_code)
    )


def injected_answer(
    head: Head, kind: str, *, result_code: int | None = None, reason_code: int | None = None
) -> Answer:
    """The answer of a status/result fault (``faults`` module); the request is not processed.

    Each kind changes one thing a client must evaluate and leaves the rest success-shaped, so a
    client that reads only part of the ``processing`` block is caught:

    * ``status_fatal``: status FATAL, ``STATUS_ERROR``, reason 1000 and *no* result element
      (legacy XSD: FATAL is like ERROR; php-library 1.8.0: fatal answers lack the usual
      elements) unless ``result_code`` is given;
    * ``status_warning``: status WARNING with the operation's own success reason and result
      (and response type) — reference §2.4: anything but OK is a failure;
    * ``result_warning``: status OK with result 405 (warning, §6.2) and the operation's
      success reason and response type.
    """
    try:
        op: Operation | None = Operation(head.operation or "")
    except ValueError:
        op = None
    ok_reason = codes.SUCCESS_REASON[op] if op is not None else 1000
    ok_result = codes.SUCCESS_RESULT[op] if op is not None else codes.RESULT_PROCESSING_FAILED
    ok_type = codes.RESPONSE_TYPE[op] if op is not None else codes.RESPONSE_TYPE_ERROR
    if kind == "status_fatal":
        status, reason, result, rtype = "FATAL", reason_code or 1000, result_code, None
    elif kind == "status_warning":
        status, reason, result = "WARNING", reason_code or ok_reason, result_code or ok_result
        rtype = ok_type
    elif kind == "result_warning":
        status, reason, result = "OK", reason_code or ok_reason, codes.RESULT_WARNING
        rtype = ok_type
    else:
        raise ValueError(f"not a status/result fault: {kind!r}")
    return Answer(
        status=status,
        reason_code=reason,
        result_code=result,
        response_type=rtype or codes.RESPONSE_TYPE_ERROR,
        reason_text=codes.reason_text(reason),
        result_text=codes.result_text(result) if result is not None else "",
    )


# --------------------------------------------------------------------------- generic checks


def check_head(head: Head, profile_id: str, security_code: str) -> Operation:
    """Operation, credential, subtype, transaction-id and content presence (in that order)."""
    if not head.operation:
        raise Refusal(201)
    try:
        op = Operation(head.operation)
    except ValueError:
        raise Refusal(202) from None
    calc = op is Operation.CALCULATION_REQUEST
    if not head.has_credential or not head.profile_id or not head.security_code:
        raise Refusal(232 if calc else 121)
    if head.profile_id != profile_id or head.security_code != security_code:
        raise Refusal(120)
    admitted = codes.SUBTYPES.get(op)
    if admitted is not None:
        if not head.subtype:
            raise Refusal(234 if calc else 214)
        if head.subtype not in admitted:
            raise Refusal(
                200,
                f"cvc-enumeration-valid: Value '{head.subtype}' is not facet-valid with "
                f"respect to enumeration {sorted(admitted)}",
            )
    if op in codes.WITHOUT_TRANSACTION:
        if head.transaction_id:
            raise Refusal(206, "" if op is Operation.PAYMENT_INIT else f"({op.value})")
    elif not head.transaction_id:
        raise Refusal(200, f"{op.value} request must contain transaction-id")
    if head.short_id and not SHORT_ID.fullmatch(head.short_id):
        raise Refusal(
            200,
            f"cvc-pattern-valid: Value '{head.short_id}' is not facet-valid with respect to "
            "pattern for type 'transactionShortIdType'.",
        )
    if op is Operation.PAYMENT_INIT and head.content is not None:
        raise Refusal(208)
    if op not in codes.WITHOUT_CONTENT and head.content is None:
        raise Refusal(233 if calc else 209)
    if head.external is not None:
        tracking = head.external.find(q("tracking"))
        for tid in tracking.iterfind(q("id")) if tracking is not None else ():
            if tid.get("provider") not in codes.TRACKING_PROVIDERS:
                raise Refusal(200, f"tracking provider {tid.get('provider')!r} is not allowed")
    return op


def amount_attr(el: etree._Element, name: str, *, required: bool = True) -> Decimal | None:
    raw = el.get(name)
    if raw is None:
        if required:
            raise Refusal(
                200, "At least one Shopping Basket Item is missing one or more mandatory attributes"
            )
        return None
    try:
        return parse_amount(raw)
    except OmsError:
        raise Refusal(
            200, f"cvc-datatype-valid.1.2.1: '{raw[:40]}' is not a valid value for 'decimal'."
        ) from None


@dataclass
class Basket:
    amount: Decimal
    currency: str
    lines: list[BasketLine]

    @property
    def items(self) -> list[BasketLine]:
        return [line for line in self.lines if line.is_item]


def parse_basket(content: etree._Element, op: Operation, *, negative_ok: bool = False) -> Basket:
    """The ``shopping-basket`` with the sum rule of reference §3.2 (mismatch ⇒ 200)."""
    el = content.find(q("shopping-basket"))
    if el is None:
        raise Refusal(210)
    amount = amount_attr(el, "amount")
    assert amount is not None
    currency = el.get("currency") or ""
    if currency not in codes.CURRENCIES:
        raise Refusal(200, f"cvc-enumeration-valid: currency '{currency}' is not allowed")
    if amount < 0 and not negative_ok:
        raise Refusal(200, "shopping basket amount must not be negative")
    lines: list[BasketLine] = []
    items = el.find(q("items"))
    for item in items.iterfind(q("item")) if items is not None else ():
        article = (item.get("article-number") or "").strip()
        qty_raw = item.get("quantity")
        price = amount_attr(item, "unit-price-gross")
        tax = amount_attr(item, "tax-rate")
        if not article or qty_raw is None:
            raise Refusal(
                200, "At least one Shopping Basket Item is missing one or more mandatory attributes"
            )
        try:
            quantity = int(qty_raw)
        except ValueError:
            raise Refusal(
                200, f"cvc-datatype-valid: '{qty_raw[:20]}' is not a valid 'int'"
            ) from None
        if quantity < 1:
            raise Refusal(200, "item quantity must be at least 1")
        discount = amount_attr(item, "discount", required=False) or Decimal("0.00")
        if discount > 0:
            raise Refusal(200, "item discount must be negative")
        assert price is not None and tax is not None
        lines.append(
            BasketLine(
                "item",
                price,
                tax,
                article,
                (item.get("unique-article-number") or "").strip(),
                quantity,
                discount,
                (item.text or "").strip(),
            )
        )
    for kind in (ledger.SHIPPING, ledger.DISCOUNT):
        found = el.findall(q(kind))
        if len(found) > 1:
            raise Refusal(200, f"only one <{kind}> per shopping basket")
        if found:
            price = amount_attr(found[0], "unit-price-gross")
            tax = amount_attr(found[0], "tax-rate")
            assert price is not None and tax is not None
            lines.append(BasketLine(kind, price, tax, name=(found[0].text or "").strip()))
    keys = [line.key for line in lines]
    if len(keys) != len(set(keys)):
        raise Refusal(
            200,
            "Each item within a shopping basket must be uniquely identifiable, either by "
            "article-number or in combination with unique-article-number",
        )
    total = ledger.basket_sum(lines)
    if total != ledger.money(amount):
        raise Refusal(
            200,
            f"shopping basket amount {format_amount(amount)} does not match the sum of its "
            f"positions {format_amount(total)}",
        )
    return Basket(ledger.money(amount), currency, lines)


def check_customer(content: etree._Element) -> etree._Element:
    """Mandatory customer fields (216, 220–227, 200 sub-messages); returns the billing address."""
    c = content.find(q("customer"))
    if c is None:
        raise Refusal(216)
    if not _text(c, "first-name"):
        raise Refusal(222)
    if not _text(c, "last-name"):
        raise Refusal(223)
    if (_text(c, "gender") or "") not in codes.GENDERS:
        raise Refusal(226)
    b2b = _text(c, "company-name") is not None
    if not b2b and not _text(c, "date-of-birth"):
        raise Refusal(227)
    dob = _text(c, "date-of-birth")
    if dob:
        try:
            datetime.strptime(dob, "%Y-%m-%d")
        except ValueError:
            raise Refusal(2003) from None
    inquiry = _text(c, "customer-allow-credit-inquiry")
    if inquiry is None:
        raise Refusal(225)
    if inquiry != "yes":
        raise Refusal(200, "Customer must allow credit agency inquiries")
    contacts = c.find(q("contacts"))
    if contacts is None:
        raise Refusal(220)
    if not _text(contacts, "email"):
        raise Refusal(221)
    phones = [contacts.find(q("phone")), contacts.find(q("mobile"))]
    if all(p is None for p in phones):
        raise Refusal(200, "phone or mobile is mandatory")
    for phone in phones:
        if phone is not None:
            digits = "".join(
                ((_text(phone, "area-code") or "") + (_text(phone, "direct-dial") or "")).split()
            )
            if len(digits) < 6:
                raise Refusal(
                    200,
                    "Area-code and direct-dial together must contain at least six "
                    "non-whitespace characters",
                )
    addresses = c.find(q("addresses"))
    if addresses is None:
        raise Refusal(224)
    billing = next(
        (a for a in addresses.iterfind(q("address")) if a.get("type") == "BILLING"), None
    )
    if billing is None:
        raise Refusal(200, "billing address is mandatory")
    for tag in ("street", "zip-code", "city", "country-code"):
        if not _text(billing, tag):
            raise Refusal(200, f"billing address {tag} must not be blank")
    if len(_text(billing, "zip-code") or "") > 10:
        raise Refusal(200, "zip-code must not be longer than 10 characters")
    if billing.get("delivery-type", "ADDRESS") != "ADDRESS":
        raise Refusal(200, "billing address must not be a pick-up location")
    for address in addresses.iterfind(q("address")):
        kind = address.get("delivery-type")
        if kind is not None and kind not in _DELIVERY_TYPES:
            raise Refusal(
                200, f"cvc-enumeration-valid: Value '{kind}' is not facet-valid for delivery-type"
            )
    if not b2b:
        for tag in _B2B_ONLY:
            if c.find(q(tag)) is not None:
                raise Refusal(200, f"{tag} is only allowed with company-name")
    bank = c.find(q("bank-account"))
    if bank is not None:
        iban = "".join((_text(bank, "iban") or "").split()).upper()
        if iban and not _iban_ok(iban):
            raise Refusal(2110)
    return billing


_DELIVERY_TYPES = frozenset({"ADDRESS", "IN_STORE_COLLECT", "PICK_UP_BOX", "PICK_UP_SHOP"})
_B2B_ONLY = ("vat-id", "company-id", "registry-location", "company-type", "homepage")


def _iban_ok(iban: str) -> bool:
    """ISO 13616 check digits (the sandbox's own check, not the client's)."""
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", iban):
        return False
    digits = "".join(str(int(ch, 36)) for ch in iban[4:] + iban[:4])
    return int(digits) % 97 == 1


def check_payment(
    content: etree._Element, basket: Basket, customer: etree._Element
) -> etree._Element:
    """Payment rules of reference §3.3 (212, 213, 217, 219, 229, 230, 231)."""
    p = content.find(q("payment"))
    if p is None:
        raise Refusal(212)
    method = p.get("method")
    if not method:
        raise Refusal(213)
    if method not in {m.value for m in codes.PaymentMethod}:
        raise Refusal(200, f"cvc-enumeration-valid: payment method '{method}' is not allowed")
    raw = _text(p, "amount")
    if raw is None:
        raise Refusal(229)
    try:
        amount = parse_amount(raw)
    except OmsError:
        raise Refusal(200, "payment amount is not a decimal") from None
    debit = _text(p, "debit-pay-type")
    if debit is not None and method != codes.PaymentMethod.INSTALLMENT:
        raise Refusal(231)
    has_bank = customer.find(q("bank-account")) is not None
    if method == codes.PaymentMethod.INSTALLMENT:
        details = p.find(q("installment-details"))
        if details is None:
            raise Refusal(217)
        if not _text(details, "installment-amount"):
            raise Refusal(219)
        if amount < basket.amount:
            raise Refusal(200, "INSTALLMENT payment amount below the basket amount")
        if debit == codes.DebitPayType.DIRECT_DEBIT and not has_bank:
            raise Refusal(230)
        if _text(customer, "company-name"):
            raise Refusal(200, "INSTALLMENT not allowed for B2B")
    else:
        if ledger.money(amount) != basket.amount:
            raise Refusal(200, "payment amount does not match the shopping basket amount")
        if method == codes.PaymentMethod.ELV and not has_bank:
            raise Refusal(230)
    return p


# --------------------------------------------------------------------------- the profile's contract

ADDRESS_FIELDS = (
    "street",
    "street-additional",
    "street-number",
    "zip-code",
    "city",
    "country-code",
)


def _address_key(address: etree._Element) -> tuple[str, ...]:
    return tuple(" ".join((_text(address, tag) or "").split()).casefold() for tag in ADDRESS_FIELDS)


def deviating_delivery(customer: etree._Element | None) -> bool:
    """True when the customer has a DELIVERY address at another place than the BILLING one.

    Only the location counts (street, number, addition, zip, city, country; case and spacing
    ignored): shops routinely send the billing address again as delivery address, and a
    recipient name alone does not make a parcel go elsewhere.
    """
    addresses = customer.find(q("addresses")) if customer is not None else None
    if addresses is None:
        return False
    by_type = {a.get("type"): a for a in addresses.iterfind(q("address"))}
    billing, delivery = by_type.get("BILLING"), by_type.get("DELIVERY")
    if delivery is None or billing is None:
        return False
    return _address_key(delivery) != _address_key(billing)


def is_b2b(customer: etree._Element | None) -> bool:
    return _text(customer, "company-name") is not None


def contract_refusal(
    cfg: SandboxConfig,
    method: str,
    amount: Decimal,
    *,
    b2b: bool,
    deviating: bool,
    language: str = "de",
    currency: str | None = None,
    billing_country: str | None = None,
    delivery_country: str | None = None,
) -> Refusal | None:
    """What the profile's contract says about ``method`` for this basket (None: allowed).

    The same fields PROFILE_REQUEST reports (reference §4.7). Validation first (product not
    active or phased out ⇒ 120; billing / delivery country not served ⇒ 2100 / 2101; currency
    not served ⇒ 200; 2005/2006/2001: ERROR / 150, §6.3 "Technical / validation"), then the
    contractual decline (2002: OK / 401 with the decline message, §4.3 "declined … 2002").
    """
    if method not in cfg.methods or method in cfg.phased_out_methods:
        state = "phased out" if method in cfg.phased_out_methods else "not active"
        return Refusal(120, f"payment method {method} is {state} for this profile")
    if billing_country is not None and billing_country not in cfg.billing_countries:
        return Refusal(2100, f"billing country {billing_country} is not served by this profile")
    if delivery_country is not None and delivery_country not in cfg.delivery_countries:
        return Refusal(2101, f"delivery country {delivery_country} is not served by this profile")
    if currency is not None and currency not in cfg.currencies:
        return Refusal(200, f"currency {currency} is not served by this profile")
    low, high = cfg.tx_limits(method, b2b=b2b)
    if amount < low:
        return Refusal(
            2005, f"{format_amount(amount)} is below the {method} minimum {format_amount(low)}"
        )
    if amount > high:
        return Refusal(
            2006, f"{format_amount(amount)} is above the {method} maximum {format_amount(high)}"
        )
    if deviating and method not in cfg.delivery_address_methods:
        return Refusal(2001)
    if b2b and method not in cfg.b2b_methods:
        return Refusal(2002, status="OK", result=401, customer_message=DECLINE_MESSAGES[language])
    return None


def profile_of(gw: SandboxGateway, head: Head) -> SandboxConfig:
    """The configuration of the profile the request's credential names."""
    return head.profile if head.profile is not None else gw.config


def _countries(customer: etree._Element | None) -> tuple[str | None, str | None]:
    """(billing country, delivery country or None) of the request's customer."""
    addresses = customer.find(q("addresses")) if customer is not None else None
    found: dict[str | None, str | None] = {}
    for address in addresses.iterfind(q("address")) if addresses is not None else ():
        found[address.get("type")] = _text(address, "country-code")
    return found.get("BILLING"), found.get("DELIVERY")


# --------------------------------------------------------------------------- operations


Handler = Callable[["SandboxGateway", Head, datetime], tuple[Answer, Transaction | None]]


def transaction_for(gw: SandboxGateway, head: Head) -> Transaction:
    tx = gw.transactions.get(head.transaction_id or "")
    if tx is None or tx.profile_id != head.profile_id:
        raise Refusal(100, "There is no regular TransactionId for the ProfileId ")
    return tx


def accepted(tx: Transaction) -> None:
    if not tx.accepted:
        raise Refusal(2300, f"transaction is {tx.state}, not accepted")


def payment_init(gw: SandboxGateway, head: Head, now: datetime) -> tuple[Answer, Transaction]:
    tx = gw.open_transaction(head.profile_id or "", now)
    return success(Operation.PAYMENT_INIT), tx


def _language(content: etree._Element, head: Head) -> str:
    c = content.find(q("customer"))
    lang = (_text(c, "language") if c is not None else None) or (
        _text(head.external, "shop-language") if head.external is not None else None
    )
    return "en" if (lang or "de").lower().startswith("en") else "de"


def _declined(cfg: SandboxConfig, content: etree._Element, basket: Basket) -> bool:
    last = (_text(content.find(q("customer")), "last-name") or "").strip()
    return last.lower() == cfg.decline_last_name.lower() or basket.amount > cfg.decline_over


def payment_query(gw: SandboxGateway, head: Head, now: datetime) -> tuple[Answer, Transaction]:
    tx = transaction_for(gw, head)
    if tx.state != ledger.INITIALIZED:
        raise Refusal(203, f"transaction is {tx.state}")
    content = head.content
    assert content is not None
    check_customer(content)
    basket = parse_basket(content, Operation.PAYMENT_QUERY)
    if not basket.items:
        raise Refusal(200, "request must contain at least one item in shopping basket")
    cfg = profile_of(gw, head)
    if _declined(cfg, content, basket):
        msg = DECLINE_MESSAGES[_language(content, head)]
        raise Refusal(703, status="OK", result=401, customer_message=msg)
    customer = content.find(q("customer"))
    b2b, deviating = is_b2b(customer), deviating_delivery(customer)
    billing, delivery = _countries(customer)
    products = E.products()
    for method in cfg.methods:
        refusal = contract_refusal(
            cfg,
            method,
            basket.amount,
            b2b=b2b,
            deviating=deviating,
            currency=basket.currency,
            billing_country=billing,
            delivery_country=delivery,
        )
        if refusal is None:
            products.append(E.product(method=method))
    return success(Operation.PAYMENT_QUERY, E.content(products)), tx


def payment_request(gw: SandboxGateway, head: Head, now: datetime) -> tuple[Answer, Transaction]:
    tx = transaction_for(gw, head)
    if tx.state != ledger.INITIALIZED:
        raise Refusal(203, f"transaction is {tx.state}; start over with PAYMENT_INIT")
    content = head.content
    assert content is not None
    try:
        billing = check_customer(content)
        basket = parse_basket(content, Operation.PAYMENT_REQUEST)
        if not basket.items:
            raise Refusal(200, "request must contain at least one item in shopping basket")
        payment = check_payment(content, basket, content.find(q("customer")))
    except Refusal:
        tx.state = ledger.FAILED  # RatePAY: after 150 on PR, start over with a new transaction
        raise
    method = payment.get("method") or ""
    tx.payment_method = method
    tx.currency = basket.currency
    tx.requested_at = now
    if head.external is not None:
        tx.merchant_consumer_id = _text(head.external, "merchant-consumer-id")
    customer = content.find(q("customer"))
    cfg = profile_of(gw, head)
    billing_country, delivery_country = _countries(customer)
    refusal = contract_refusal(
        cfg,
        method,
        basket.amount,
        b2b=is_b2b(customer),
        deviating=deviating_delivery(customer),
        language=_language(content, head),
        currency=basket.currency,
        billing_country=billing_country,
        delivery_country=delivery_country,
    )
    if refusal is not None:
        if refusal.result == codes.RESULT_DECLINED:
            tx.state = ledger.DECLINED
            tx.amount = basket.amount
        else:
            tx.state = ledger.FAILED  # a 150: start over with a new PAYMENT_INIT
        raise refusal
    last_name = (_text(customer, "last-name") or "").strip().lower()
    if last_name == cfg.identity_decline_last_name.lower():
        tx.state = ledger.DECLINED
        tx.amount = basket.amount
        msg = IDENTITY_MESSAGES[_language(content, head)]
        raise Refusal(730, status="ERROR", result=150, customer_message=msg)
    if _declined(cfg, content, basket):
        tx.state = ledger.DECLINED
        tx.amount = basket.amount
        msg = DECLINE_MESSAGES[_language(content, head)]
        raise Refusal(703, status="OK", result=401, customer_message=msg)
    ledger.authorise(tx, basket.lines)
    tx.state = ledger.REQUESTED
    tx.descriptor = gw.new_descriptor()
    if head.external is not None:
        tx.order_id = _text(head.external, "order-id")
    address = E.address(
        *[
            E(tag, value)
            for tag in ("street", "street-number", "zip-code", "city", "country-code")
            if (value := _text(billing, tag))
        ]
    )
    body = E.content(
        E.customer(E.addresses(address)),
        E.payment(
            E.amount(format_amount(parse_amount(_text(payment, "amount")))),
            E.descriptor(tx.descriptor),
            method=method,
            currency=basket.currency,
        ),
    )
    msg = ACCEPT_MESSAGES[_language(content, head)]
    return success(Operation.PAYMENT_REQUEST, body, customer_message=msg), tx


def payment_confirm(gw: SandboxGateway, head: Head, now: datetime) -> tuple[Answer, Transaction]:
    tx = transaction_for(gw, head)
    accepted(tx)
    if head.external is not None and _text(head.external, "order-id"):
        tx.order_id = _text(head.external, "order-id")
    if tx.state == ledger.REQUESTED:
        tx.state = ledger.CONFIRMED
    return success(Operation.PAYMENT_CONFIRM), tx


def _ledger(fn: Callable[[], ledger.Booking]) -> ledger.Booking:
    try:
        return fn()
    except LedgerRefusal as exc:
        raise Refusal(exc.reason_code, str(exc)) from None


def confirmation_deliver(
    gw: SandboxGateway, head: Head, now: datetime
) -> tuple[Answer, Transaction]:
    tx = transaction_for(gw, head)
    accepted(tx)
    assert head.content is not None
    check_invoicing(head.content.find(q("invoicing")))
    basket = parse_basket(head.content, Operation.CONFIRMATION_DELIVER)
    _ledger(lambda: ledger.deliver(tx, basket.lines, now))
    return success(Operation.CONFIRMATION_DELIVER), tx


INVOICING_DATE = "%Y-%m-%dT%H:%M:%S"


def check_invoicing(invoicing: etree._Element | None) -> None:
    """``invoicing`` dates in RatePAY's format (``YYYY-MM-DDThh:mm:ss``, no zone: else 200) and
    a due date not before the invoice date (2004 "Due date parameter(s) not valid")."""
    if invoicing is None:
        return
    found: dict[str, datetime] = {}
    for tag in ("invoice-date", "delivery-date", "due-date"):
        raw = _text(invoicing, tag)
        if raw is None:
            continue
        try:
            found[tag] = datetime.strptime(raw, INVOICING_DATE)
        except ValueError:
            raise Refusal(
                200, f"cvc-datatype-valid: '{raw[:40]}' is not a valid value for '{tag}'"
            ) from None
    start = found.get("invoice-date") or found.get("delivery-date")
    if "due-date" in found and start is not None and found["due-date"].date() < start.date():
        raise Refusal(2004, "due-date is before the invoice date")
    invoice_id = _text(invoicing, "invoice-id")
    if invoice_id is not None and len(invoice_id) > 255:
        raise Refusal(200, "invoice-id is longer than 255 characters")


def payment_change(gw: SandboxGateway, head: Head, now: datetime) -> tuple[Answer, Transaction]:
    tx = transaction_for(gw, head)
    accepted(tx)
    assert head.content is not None
    subtype = head.subtype
    basket = parse_basket(head.content, Operation.PAYMENT_CHANGE, negative_ok=subtype == "credit")
    if subtype == "cancellation":
        _ledger(lambda: ledger.cancel(tx, basket.lines, now))
    elif subtype == "return":
        _ledger(lambda: ledger.return_goods(tx, basket.lines, now))
    elif subtype == "credit":
        _ledger(lambda: ledger.credit(tx, basket.lines, now))
    else:
        _ledger(lambda: ledger.change_order(tx, basket.lines, now))
    return success(Operation.PAYMENT_CHANGE), tx


def _inst_config(cfg: SandboxConfig) -> etree._Element:
    ic = cfg.installment
    return E(
        "installment-configuration-result",
        E("interestrate-min", format_amount(ic.interest_rate_min)),
        E("interestrate-default", format_amount(ic.interest_rate_default)),
        E("interestrate-max", format_amount(ic.interest_rate_max)),
        E("interest-rate-merchant-towards-bank", "0.00"),
        E("month-number-min", str(ic.month_min)),
        E("month-number-max", str(ic.month_max)),
        E("month-longrun", str(ic.month_max)),
        E("amount-min-longrun", format_amount(ic.amount_min)),
        E("month-allowed", ",".join(str(m) for m in ic.month_allowed)),
        E("valid-payment-firstdays", ",".join(str(d) for d in ic.valid_payment_firstdays)),
        E("payment-firstday", str(ic.payment_firstday)),
        E("payment-amount", format_amount(ic.amount_min)),
        E("payment-lastrate", format_amount(ic.rate_min)),
        E("rate-min-normal", format_amount(ic.rate_min)),
        E("rate-min-longrun", format_amount(ic.rate_min)),
        E("service-charge", format_amount(ic.service_charge)),
        E("min-difference-dueday", "9"),
        name=cfg.profile_id,
        type="DEFAULT",
    )


def profile_request(gw: SandboxGateway, head: Head, now: datetime) -> tuple[Answer, None]:
    """The profile's ``master-data``: exactly the contract ``contract_refusal`` enforces."""
    cfg = profile_of(gw, head)
    md = E(
        "master-data",
        E("profile-id", cfg.profile_id),
        E("merchant-name", cfg.merchant_name),
        E("shop-name", cfg.shop_name),
        E("merchant-status", "2"),
    )
    for method in ("invoice", "installment", "elv", "prepayment"):
        name = method.upper()
        status = "3" if name in cfg.phased_out_methods else "2" if name in cfg.methods else "1"
        md.append(E(f"activation-status-{method}", status))
        md.append(E(f"eligibility-ratepay-{method}", "yes" if name in cfg.methods else "no"))
    for method in ("invoice", "installment", "elv", "prepayment"):
        name = method.upper()
        low, high = cfg.tx_limits(name)
        md.append(E(f"tx-limit-{method}-min", format_amount(low)))
        md.append(E(f"tx-limit-{method}-max", format_amount(high)))
        md.append(E(f"tx-limit-{method}-max-b2b", format_amount(cfg.tx_limits(name, b2b=True)[1])))
        md.append(E(f"b2b-{method}", "yes" if name in cfg.b2b_methods else "no"))
        md.append(
            E(f"delivery-address-{method}", "yes" if name in cfg.delivery_address_methods else "no")
        )
    md.extend(
        [
            E("eligibility-device-fingerprint", "yes"),
            E("device-fingerprint-snippet-id", "ratepay"),
            E("country-code-billing", ",".join(cfg.billing_countries)),
            E("country-code-delivery", ",".join(cfg.delivery_countries)),
            E("currency", ",".join(cfg.currencies)),
        ]
    )
    body = E.content(md, _inst_config(cfg))
    return success(Operation.PROFILE_REQUEST, body, result_text=codes.PROFILE_RESULT_TEXT), None


def configuration_request(gw: SandboxGateway, head: Head, now: datetime) -> tuple[Answer, None]:
    return success(
        Operation.CONFIGURATION_REQUEST,
        E.content(_inst_config(profile_of(gw, head))),
        reason_text="Calculation configuration read successful",
    ), None


def calculation_request(gw: SandboxGateway, head: Head, now: datetime) -> tuple[Answer, None]:
    assert head.content is not None
    calc = head.content.find(q("installment-calculation"))
    if calc is None:
        raise Refusal(200, "content must contain installment-calculation")

    def dec(path: str) -> Decimal | None:
        el = calc.find(path, namespaces={"r": RATEPAY_NS})
        if el is None or not (el.text or "").strip():
            return None
        try:
            return parse_amount(el.text)
        except OmsError:
            raise Refusal(200, f"cvc-datatype-valid: {path} is not a decimal") from None

    amount = dec("r:amount")
    if amount is None:
        raise Refusal(200, "installment-calculation amount is mandatory")
    firstday = dec("r:payment-firstday")
    interest = dec("r:configuration/r:interest-rate")
    ic = profile_of(gw, head).installment
    if firstday is not None and int(firstday) not in ic.valid_payment_firstdays:
        raise Refusal(200, f"payment-firstday must be one of {ic.valid_payment_firstdays}")
    try:
        if head.subtype == codes.CalculationSubtype.BY_TIME:
            month = dec("r:calculation-time/r:month")
            if month is None:
                raise Refusal(200, "calculation-by-time needs calculation-time/month")
            plan = installments.by_time(
                amount, int(month), ic, interest, int(firstday) if firstday else None
            )
        else:
            rate = dec("r:calculation-rate/r:rate")
            if rate is None:
                raise Refusal(200, "calculation-by-rate needs calculation-rate/rate")
            plan = installments.by_rate(
                amount, rate, ic, interest, int(firstday) if firstday else None
            )
    except installments.CalculationFailed as exc:
        return Answer(
            status="OK",
            reason_code=exc.reason_code,
            result_code=503,
            response_type=codes.RESPONSE_TYPE_ERROR,
            reason_text=codes.reason_text(exc.reason_code),
            result_text=codes.result_text(503),
        ), None
    result = E(
        "installment-calculation-result",
        E("total-amount", format_amount(plan.total_amount)),
        E("amount", format_amount(plan.amount)),
        E("interest-amount", format_amount(plan.interest_amount)),
        E("service-charge", format_amount(plan.service_charge)),
        E("interest-rate", format_amount(plan.interest_rate)),
        E("annual-percentage-rate", format_amount(plan.annual_percentage_rate)),
        E("monthly-debit-interest", format_amount(plan.monthly_debit_interest)),
        E("number-of-rates", str(plan.number_of_rates)),
        E("rate", format_amount(plan.rate)),
        E("last-rate", format_amount(plan.last_rate)),
        E("payment-firstday", str(plan.payment_firstday)),
    )
    return success(Operation.CALCULATION_REQUEST, E.content(result), reason=plan.reason_code), None


HANDLERS: dict[Operation, Handler] = {
    Operation.PAYMENT_INIT: payment_init,
    Operation.PAYMENT_QUERY: payment_query,
    Operation.PAYMENT_REQUEST: payment_request,
    Operation.PAYMENT_CONFIRM: payment_confirm,
    Operation.CONFIRMATION_DELIVER: confirmation_deliver,
    Operation.PAYMENT_CHANGE: payment_change,
    Operation.PROFILE_REQUEST: profile_request,
    Operation.CONFIGURATION_REQUEST: configuration_request,
    Operation.CALCULATION_REQUEST: calculation_request,
}


def process(gw: SandboxGateway, head: Head, now: datetime) -> tuple[Answer, Transaction | None]:
    """Validate and run one parsed request; the caller holds the gateway lock."""
    tx: Transaction | None = None
    try:
        head.profile = gw.config_for(head.profile_id)
        op = check_head(head, head.profile.profile_id, head.profile.security_code)
        if op not in codes.WITHOUT_TRANSACTION:
            tx = gw.transactions.get(head.transaction_id or "")
        return HANDLERS[op](gw, head, now)
    except Refusal as refusal:
        if tx is not None and tx.profile_id != head.profile_id:
            tx = None
        return refusal_answer(head, refusal), tx
