"""Request builders: typed inputs → validated RatePAY XML documents (lxml).

Every builder validates first and raises ``RatepayValidationError`` before any XML exists, so
invalid input never reaches the transport. Element order is the documented one (reference §2.2
for ``head``, §8 for ``content``); free text is escaped by lxml (no hand-made CDATA); amounts are
``Decimal`` rendered with two places.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from lxml import etree

from ratepay_oms.ratepay.codes import (
    CURRENCIES,
    GENDERS,
    QUERY_SUBTYPE_FULL,
    SUBTYPES,
    TRACKING_PROVIDERS,
    WITHOUT_TRANSACTION,
    CalculationSubtype,
    ChangeSubtype,
    DebitPayType,
    DeliveryType,
    Operation,
    PaymentMethod,
)
from ratepay_oms.ratepay.errors import RatepayValidationError
from ratepay_oms.ratepay.settings import RatepaySettings
from ratepay_oms.ratepay.types import (
    Address,
    BankAccount,
    Basket,
    BasketItem,
    BasketPosition,
    Customer,
    Invoicing,
    PaymentInfo,
    Tracking,
)
from ratepay_oms.ratepay.xml import format_amount
from ratepay_oms.sepa import bic_problem, iban_problem, normalise_iban

ORDER_ID_MAX = 50
"""``external/order-id``: at most 50 characters at RatePAY."""

log = logging.getLogger(__name__)

API_VERSION = "1.8"

_COUNTRY_CODE = re.compile(r"[A-Z]{2}")
_DEVICE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,255}")
_PAYMENT_METHODS = frozenset(m.value for m in PaymentMethod)
_DEBIT_PAY_TYPES = frozenset(t.value for t in DebitPayType)
_DELIVERY_TYPES = (None, *(t.value for t in DeliveryType))


@dataclass(frozen=True)
class BuiltRequest:
    """A request document plus what the API log needs to know about it."""

    operation: Operation
    subtype: str | None
    transaction_id: str | None
    order_ref: str | None
    root: etree._Element


# --- validation ----------------------------------------------------------------------------


def _money(value: object, what: str) -> Decimal:
    if not isinstance(value, Decimal) or isinstance(value, bool):
        raise RatepayValidationError(f"{what} must be a Decimal, got {type(value).__name__}")
    if not value.is_finite():
        raise RatepayValidationError(f"{what} must be a finite amount")
    return value


def _text(value: object, what: str, *, max_len: int = 255) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RatepayValidationError(f"{what} is required")
    if len(value) > max_len:
        raise RatepayValidationError(f"{what} is longer than {max_len} characters")
    return value


def _check_item(item: BasketItem, where: str) -> None:
    label = f"{where} item {item.article_number!r}"
    _text(item.article_number, f"{where} item article-number")
    _text(item.name, f"{label} name")
    if isinstance(item.quantity, bool) or not isinstance(item.quantity, int):
        raise RatepayValidationError(f"{label}: quantity must be a whole number")
    if item.quantity < 1:
        raise RatepayValidationError(f"{label}: quantity must be at least 1, got {item.quantity}")
    _money(item.unit_price_gross, f"{label} unit-price-gross")
    _money(item.tax_rate, f"{label} tax-rate")
    if _money(item.discount, f"{label} discount") > 0:
        raise RatepayValidationError(f"{label}: discount must be negative or zero")


def _check_basket(
    basket: Basket,
    where: str,
    *,
    need_item: bool,
    allow_negative_amount: bool = False,
    adjustment: bool = False,
) -> Decimal:
    """Refuses a basket RatePAY would refuse; returns its amount (worked out once here, for
    the document)."""
    if not isinstance(basket, Basket):
        raise RatepayValidationError(f"{where}: basket must be a Basket")
    if basket.currency not in CURRENCIES:
        raise RatepayValidationError(f"{where}: unknown currency {basket.currency!r}")
    if need_item and not basket.items:
        raise RatepayValidationError(f"{where}: the basket has no items")
    if basket.is_empty:
        raise RatepayValidationError(f"{where}: the basket has no positions")
    keys: set[str] = set()
    for item in basket.items:
        _check_item(item, where)
        if item.key in keys:
            raise RatepayValidationError(
                f"{where}: article {item.key!r} appears twice; set unique_article_number"
            )
        keys.add(item.key)
    if basket.shipping is not None:
        _money(basket.shipping.unit_price_gross, f"{where} shipping")
        _money(basket.shipping.tax_rate, f"{where} shipping tax-rate")
        if basket.shipping.unit_price_gross < 0:
            raise RatepayValidationError(f"{where}: shipping must not be negative")
    if basket.discount is not None:
        _money(basket.discount.unit_price_gross, f"{where} discount")
        _money(basket.discount.tax_rate, f"{where} discount tax-rate")
        if basket.discount.unit_price_gross > 0 and not adjustment:
            raise RatepayValidationError(f"{where}: the basket discount must be negative")
    amount = basket.amount
    if not allow_negative_amount and amount < 0:
        raise RatepayValidationError(f"{where}: basket amount {amount} is negative")
    return amount


def _check_transaction_id(transaction_id: object, operation: Operation) -> str:
    if not isinstance(transaction_id, str) or not transaction_id.strip():
        raise RatepayValidationError(f"{operation} needs the transaction id from PAYMENT_INIT")
    return _text(transaction_id, "transaction id")


def _check_customer(customer: Customer) -> None:
    if not isinstance(customer, Customer):
        raise RatepayValidationError("customer must be a Customer")
    _text(customer.first_name, "customer first name")
    _text(customer.last_name, "customer last name")
    _text(customer.email, "customer email")
    if customer.gender not in GENDERS:
        raise RatepayValidationError(f"customer gender must be M, F or U, got {customer.gender!r}")
    if not customer.company_name and customer.date_of_birth is None:
        raise RatepayValidationError("customer date of birth is required for B2C")
    if not (customer.phone or customer.mobile):
        raise RatepayValidationError("customer needs a phone or mobile number")
    for address, kind in (
        (customer.billing_address, "billing"),
        (customer.delivery_address, "delivery"),
    ):
        if address is None:
            continue
        _text(address.street, f"{kind} street", max_len=100)
        _text(address.zip_code, f"{kind} zip code", max_len=10)
        _text(address.city, f"{kind} city")
        if not _COUNTRY_CODE.fullmatch(address.country_code or ""):
            raise RatepayValidationError(f"{kind} country code must be ISO alpha-2 upper case")
    if customer.delivery_address is not None and not (
        customer.delivery_address.first_name and customer.delivery_address.last_name
    ):
        raise RatepayValidationError("a delivery address needs first and last name")
    company_fields = {
        "vat id": customer.vat_id,
        "company id": customer.company_id,
        "registry location": customer.registry_location,
        "company type": customer.company_type,
        "homepage": customer.homepage,
    }
    for name, value in company_fields.items():
        if value and not customer.company_name:
            raise RatepayValidationError(f"{name} is only allowed with a company name (B2B)")
    if customer.billing_address.delivery_type not in (None, DeliveryType.ADDRESS):
        raise RatepayValidationError("a billing address is not a pick-up location")
    if (
        customer.delivery_address is not None
        and customer.delivery_address.delivery_type not in _DELIVERY_TYPES
    ):
        raise RatepayValidationError(
            "delivery type must be one of " + ", ".join(t.value for t in DeliveryType)
        )
    if customer.bank_account is not None:
        _text(customer.bank_account.owner, "bank account owner")
        iban = normalise_iban(_text(customer.bank_account.iban, "bank account IBAN", max_len=42))
        problem = iban_problem(iban)
        if problem:
            raise RatepayValidationError(f"bank account: {problem}")
        if customer.bank_account.bic and bic_problem(customer.bank_account.bic):
            raise RatepayValidationError(f"bank account: {bic_problem(customer.bank_account.bic)}")


def _check_payment(payment: PaymentInfo, customer: Customer) -> None:
    if not isinstance(payment, PaymentInfo):
        raise RatepayValidationError("payment must be a PaymentInfo")
    if payment.method not in _PAYMENT_METHODS:
        raise RatepayValidationError(
            f"unknown payment method {payment.method!r}; use one of "
            f"{', '.join(sorted(_PAYMENT_METHODS))}"
        )
    if payment.method == PaymentMethod.ELV and customer.bank_account is None:
        raise RatepayValidationError("payment method ELV needs the customer's bank account")
    if payment.method == PaymentMethod.INSTALLMENT:
        if payment.installment is None:
            raise RatepayValidationError("payment method INSTALLMENT needs installment details")
        if payment.debit_pay_type not in _DEBIT_PAY_TYPES:
            raise RatepayValidationError(
                "payment method INSTALLMENT needs debit_pay_type DIRECT-DEBIT or BANK-TRANSFER"
            )
        if payment.debit_pay_type == DebitPayType.DIRECT_DEBIT and customer.bank_account is None:
            raise RatepayValidationError("INSTALLMENT with DIRECT-DEBIT needs a bank account")
        if customer.company_name:
            raise RatepayValidationError("INSTALLMENT is not allowed for B2B customers")
        plan = payment.installment
        _money(plan.total_amount, "installment total amount")
        _money(plan.rate, "installment rate")
        _money(plan.last_rate, "installment last rate")
        _money(plan.interest_rate, "installment interest rate")
        if plan.number_of_rates < 1:
            raise RatepayValidationError("installment number of rates must be at least 1")
    else:
        if payment.installment is not None or payment.debit_pay_type is not None:
            raise RatepayValidationError(
                "installment details and debit pay type are for INSTALLMENT only"
            )


# --- XML helpers ---------------------------------------------------------------------------


class _AttributeNames(dict[str, str]):
    """Keyword → attribute name (``tax_rate`` → ``tax-rate``), each worked out once."""

    def __missing__(self, key: str) -> str:
        name = self[key] = key.replace("_", "-")
        return name


_ATTRIBUTE_NAMES = _AttributeNames()


class _Writer:
    """Creates namespaced elements; turns lxml's refusal of control characters into a
    validation error instead of a crash."""

    def __init__(self, ns: str) -> None:
        self.ns = ns

    def el(
        self,
        parent: etree._Element | None,
        tag: str,
        text: str | None = None,
        **attrs: str | None,
    ) -> etree._Element:
        name = f"{{{self.ns}}}{tag}"
        try:
            if parent is None:
                node = etree.Element(name, nsmap={None: self.ns})  # type: ignore[dict-item]
                for key, value in attrs.items():
                    if value is not None:
                        node.set(_ATTRIBUTE_NAMES[key], value)
            elif attrs:  # the attributes in one go, in the order given
                node = etree.SubElement(
                    parent,
                    name,
                    {_ATTRIBUTE_NAMES[key]: value for key, value in attrs.items()
                     if value is not None},
                )
            else:
                node = etree.SubElement(parent, name)
            if text is not None:
                node.text = text
        except ValueError as exc:
            raise RatepayValidationError(
                f"<{tag}> holds characters XML cannot carry: {exc}"
            ) from None
        return node

    def set(self, node: etree._Element, tag: str, key: str, value: str) -> None:
        """``node.set(key, value)`` with el's refusal of control characters."""
        try:
            node.set(key, value)
        except ValueError as exc:
            raise RatepayValidationError(
                f"<{tag}> holds characters XML cannot carry: {exc}"
            ) from None

    def opt(self, parent: etree._Element, tag: str, text: str | None) -> None:
        if text is not None and text != "":
            self.el(parent, tag, text)


def _dt(value: datetime | date, zone: ZoneInfo) -> str:
    """An invoicing date as RatePAY reads it: ``YYYY-MM-DDThh:mm:ss`` in the shop's time zone
    (the format has no zone, reference §1.3). An aware datetime is converted; a naive one is
    UTC, as every datetime of this project; a ``date`` is that day at 00:00."""
    return _local(value, zone).isoformat()


def _local(value: datetime | date, zone: ZoneInfo) -> datetime:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.astimezone(zone).replace(tzinfo=None, microsecond=0)
    return datetime(value.year, value.month, value.day)


def check_invoicing(invoicing: Invoicing, zone: ZoneInfo, now: datetime | None = None) -> None:
    """RatePAY's window for CONFIRMATION_DELIVER invoicing, checked before sending: delivery and
    invoice date not after today (the shop's day: RatePAY wants the delivery reported on the
    day of dispatch, reference §4.5), the due date not before the invoice date (else 2004
    "Due date parameter(s) not valid")."""
    if not isinstance(invoicing, Invoicing):
        raise RatepayValidationError("invoicing must be an Invoicing")
    if invoicing.invoice_id is not None:
        _text(invoicing.invoice_id, "invoice id")
    today = _local(now or datetime.now(UTC), zone).date()
    for what, when in (
        ("invoice date", invoicing.invoice_date),
        ("delivery date", invoicing.delivery_date),
        ("due date", invoicing.due_date),
    ):
        if when is not None and not isinstance(when, date):
            raise RatepayValidationError(f"{what} must be a date or datetime")
    for what, when in (
        ("invoice date", invoicing.invoice_date),
        ("delivery date", invoicing.delivery_date),
    ):
        if when is not None and _local(when, zone).date() > today:
            raise RatepayValidationError(
                f"{what} {_local(when, zone):%Y-%m-%d} ({zone.key}) is in the future; RatePAY "
                "takes a delivery on the day of dispatch"
            )
    if invoicing.due_date is not None:
        start = invoicing.invoice_date or invoicing.delivery_date or now or datetime.now(UTC)
        if _local(invoicing.due_date, zone).date() < _local(start, zone).date():
            raise RatepayValidationError(
                f"due date {_local(invoicing.due_date, zone):%Y-%m-%d} is before the invoice "
                f"date {_local(start, zone):%Y-%m-%d}"
            )


def _rate(value: Decimal) -> str:
    """Tax / interest rates as sent in Ratepay's samples: ``19``, ``7``, ``13.7``."""
    text = f"{value.normalize():f}"
    return text


class RequestBuilder:
    """Builds one request document per operation from validated inputs."""

    def __init__(self, settings: RatepaySettings) -> None:
        self.settings = settings
        self.w = _Writer(settings.xmlns_urn)
        self._template: tuple[RatepaySettings, etree._Element] | None = None

    def _request(self) -> etree._Element:
        """A new ``request`` with what every request carries: ``head`` with ``system-id``,
        an empty ``operation``, ``credential`` and ``meta``, copied from one built with the
        same writer the first time (and again should ``settings`` be replaced): the same
        elements, without building them one by one for every call. Settings XML cannot
        carry raise on every call, as before: a template is kept only once it was built."""
        template = self._template
        if template is None or template[0] is not self.settings:
            s, w = self.settings, self.w
            root = w.el(None, "request", version=s.request_version)
            head = w.el(root, "head")
            w.el(head, "system-id", s.system_id)
            w.el(head, "operation")
            credential = w.el(head, "credential")
            w.el(credential, "profile-id", s.profile_id)
            w.el(credential, "securitycode", s.security_code)
            meta = w.el(head, "meta")
            systems = w.el(meta, "systems")
            w.el(systems, "system", name=s.client_name, version=s.client_version)
            w.el(systems, "api-version", API_VERSION)
            template = self._template = (s, root)
        return copy.deepcopy(template[1])

    # head ----------------------------------------------------------------------------------

    def _envelope(
        self,
        operation: Operation,
        *,
        subtype: str | None = None,
        transaction_id: str | None = None,
        order_id: str | None = None,
        merchant_consumer_id: str | None = None,
        tracking: Sequence[Tracking] = (),
        device_token: str | None = None,
    ) -> tuple[etree._Element, etree._Element]:
        if operation in SUBTYPES and subtype not in SUBTYPES[operation]:
            raise RatepayValidationError(f"{operation} needs a subtype, got {subtype!r}")
        if operation in WITHOUT_TRANSACTION:
            transaction_id = None
        w = self.w
        root = self._request()
        head = root[0]
        system_id, operation_node, _, meta = head
        if subtype is not None:
            w.set(operation_node, "operation", "subtype", subtype)
        operation_node.text = operation.value
        if transaction_id is not None and transaction_id != "":
            system_id.addnext(w.el(head, "transaction-id", transaction_id))
        if order_id is not None and len(order_id) > ORDER_ID_MAX:
            raise RatepayValidationError(f"order id longer than {ORDER_ID_MAX} characters")
        if order_id or merchant_consumer_id or tracking:
            external = w.el(head, "external")
            w.opt(external, "order-id", order_id)
            w.opt(external, "merchant-consumer-id", merchant_consumer_id)
            if tracking:
                tracking_el = w.el(external, "tracking")
                for parcel in tracking:
                    w.el(tracking_el, "id", parcel.code, provider=parcel.provider)
        if device_token:
            if not _DEVICE_TOKEN.fullmatch(device_token):
                raise RatepayValidationError(
                    "device token must be a UUID or letters, digits, '_' and '-'"
                )
            device = w.el(head, "customer-device")
            w.el(device, "device-token", device_token)
        if head[-1] is not meta:  # external / customer-device were added after it
            head.append(meta)
        return root, head

    # content parts ---------------------------------------------------------------------------

    def _basket(
        self, parent: etree._Element, basket: Basket, amount: Decimal, *, full: bool = False
    ) -> None:
        """``amount`` is the basket's (``_check_basket``'s answer), 0 for the full form."""
        w = self.w
        node = w.el(
            parent, "shopping-basket", amount=format_amount(amount), currency=basket.currency
        )
        if basket.items or full:
            items = w.el(node, "items")
            for item in basket.items:
                w.el(
                    items,
                    "item",
                    item.name,
                    article_number=item.article_number,
                    unique_article_number=item.unique_article_number,
                    quantity=str(item.quantity),
                    unit_price_gross=format_amount(item.unit_price_gross),
                    tax_rate=_rate(item.tax_rate),
                    discount=format_amount(item.discount) if item.discount != 0 else None,
                    category=item.category,
                    description_addition=item.description_addition,
                )
        for tag, position in (("shipping", basket.shipping), ("discount", basket.discount)):
            if position is not None:
                self._position(node, tag, position)

    def _position(self, parent: etree._Element, tag: str, position: BasketPosition) -> None:
        self.w.el(
            parent,
            tag,
            position.name,
            unit_price_gross=format_amount(position.unit_price_gross),
            tax_rate=_rate(position.tax_rate),
            description_addition=position.description_addition,
        )

    def _address(self, parent: etree._Element, address: Address, kind: str) -> None:
        w = self.w
        node = w.el(parent, "address", type=kind)
        if kind == "DELIVERY" and address.delivery_type not in (None, DeliveryType.ADDRESS):
            node.set("delivery-type", str(address.delivery_type))
        if kind == "DELIVERY":
            w.opt(node, "first-name", address.first_name)
            w.opt(node, "last-name", address.last_name)
            w.opt(node, "company", address.company)
        w.el(node, "street", address.street)
        w.opt(node, "street-additional", address.street_additional)
        w.opt(node, "street-number", address.street_number)
        w.el(node, "zip-code", address.zip_code)
        w.el(node, "city", address.city)
        w.el(node, "country-code", address.country_code)

    def _bank_account(self, parent: etree._Element, account: BankAccount) -> None:
        w = self.w
        node = w.el(parent, "bank-account")
        w.el(node, "owner", account.owner)
        w.opt(node, "bank-name", account.bank_name)
        w.el(node, "iban", normalise_iban(account.iban))
        w.opt(node, "bic-swift", account.bic)

    def _customer(
        self, parent: etree._Element, customer: Customer, *, with_bank_account: bool
    ) -> None:
        w = self.w
        node = w.el(parent, "customer")
        w.el(node, "first-name", customer.first_name)
        w.el(node, "last-name", customer.last_name)
        w.el(node, "gender", customer.gender)
        if customer.date_of_birth is not None:
            w.el(node, "date-of-birth", customer.date_of_birth.isoformat())
        w.opt(node, "ip-address", customer.ip_address)
        contacts = w.el(node, "contacts")
        w.el(contacts, "email", customer.email)
        for tag, number in (("phone", customer.phone), ("mobile", customer.mobile)):
            if number:
                w.el(w.el(contacts, tag), "direct-dial", number)
        addresses = w.el(node, "addresses")
        self._address(addresses, customer.billing_address, "BILLING")
        if customer.delivery_address is not None:
            self._address(addresses, customer.delivery_address, "DELIVERY")
        if with_bank_account and customer.bank_account is not None:
            self._bank_account(node, customer.bank_account)
        w.opt(node, "nationality", customer.nationality)
        w.opt(node, "language", customer.language)
        w.el(
            node, "customer-allow-credit-inquiry", "yes" if customer.allow_credit_inquiry else "no"
        )
        w.opt(node, "company-name", customer.company_name)
        w.opt(node, "vat-id", customer.vat_id)
        w.opt(node, "company-id", customer.company_id)
        w.opt(node, "registry-location", customer.registry_location)
        w.opt(node, "company-type", customer.company_type)
        w.opt(node, "homepage", customer.homepage)

    def _payment(
        self, parent: etree._Element, payment: PaymentInfo, basket: Basket, amount: Decimal
    ) -> None:
        w = self.w
        node = w.el(parent, "payment", method=payment.method, currency=basket.currency)
        plan = payment.installment
        if payment.method == PaymentMethod.INSTALLMENT and plan is not None:
            w.el(node, "amount", format_amount(plan.total_amount))
            details = w.el(node, "installment-details")
            w.el(details, "installment-number", str(plan.number_of_rates))
            w.el(details, "installment-amount", format_amount(plan.rate))
            w.el(details, "last-installment-amount", format_amount(plan.last_rate))
            w.el(details, "interest-rate", _rate(plan.interest_rate))
            w.el(details, "payment-firstday", str(plan.payment_firstday))
            w.el(node, "debit-pay-type", payment.debit_pay_type)
        else:
            w.el(node, "amount", format_amount(amount))

    # operations --------------------------------------------------------------------------

    def payment_init(self, order_ref: str | None = None) -> BuiltRequest:
        """``order_ref`` is not sent (PAYMENT_INIT carries none); the API log files the call
        under it, so ``log --order`` shows a refused PAYMENT_INIT too."""
        root, _ = self._envelope(Operation.PAYMENT_INIT)
        return BuiltRequest(Operation.PAYMENT_INIT, None, None, order_ref, root)

    def payment_query(
        self,
        transaction_id: str,
        customer: Customer,
        basket: Basket,
        *,
        order_id: str | None = None,
        merchant_consumer_id: str | None = None,
        device_token: str | None = None,
    ) -> BuiltRequest:
        op = Operation.PAYMENT_QUERY
        transaction_id = _check_transaction_id(transaction_id, op)
        _check_customer(customer)
        amount = _check_basket(basket, op, need_item=True)
        root, _ = self._envelope(
            op,
            subtype=QUERY_SUBTYPE_FULL,
            transaction_id=transaction_id,
            order_id=order_id,
            merchant_consumer_id=merchant_consumer_id,
            device_token=device_token,
        )
        content = self.w.el(root, "content")
        self._customer(content, customer, with_bank_account=False)
        self._basket(content, basket, amount)
        return BuiltRequest(op, QUERY_SUBTYPE_FULL, transaction_id, order_id, root)

    def payment_request(
        self,
        transaction_id: str,
        customer: Customer,
        basket: Basket,
        payment: PaymentInfo,
        *,
        order_id: str | None = None,
        merchant_consumer_id: str | None = None,
        device_token: str | None = None,
    ) -> BuiltRequest:
        op = Operation.PAYMENT_REQUEST
        transaction_id = _check_transaction_id(transaction_id, op)
        _check_customer(customer)
        amount = _check_basket(basket, op, need_item=True)
        _check_payment(payment, customer)
        needs_account = payment.method == PaymentMethod.ELV or (
            payment.method == PaymentMethod.INSTALLMENT
            and payment.debit_pay_type == DebitPayType.DIRECT_DEBIT
        )
        root, _ = self._envelope(
            op,
            transaction_id=transaction_id,
            order_id=order_id,
            merchant_consumer_id=merchant_consumer_id,
            device_token=device_token,
        )
        content = self.w.el(root, "content")
        self._customer(content, customer, with_bank_account=needs_account)
        self._basket(content, basket, amount)
        self._payment(content, payment, basket, amount)
        return BuiltRequest(op, None, transaction_id, order_id, root)

    def payment_confirm(self, transaction_id: str, order_id: str | None) -> BuiltRequest:
        op = Operation.PAYMENT_CONFIRM
        transaction_id = _check_transaction_id(transaction_id, op)
        root, _ = self._envelope(op, transaction_id=transaction_id, order_id=order_id)
        return BuiltRequest(op, None, transaction_id, order_id, root)

    def confirmation_deliver(
        self,
        transaction_id: str,
        basket: Basket,
        *,
        order_id: str | None = None,
        invoicing: Invoicing | None = None,
        tracking: Iterable[Tracking] = (),
    ) -> BuiltRequest:
        op = Operation.CONFIRMATION_DELIVER
        transaction_id = _check_transaction_id(transaction_id, op)
        amount = _check_basket(basket, op, need_item=False)
        parcels = tuple(tracking)
        for parcel in parcels:
            if parcel.provider not in TRACKING_PROVIDERS:
                raise RatepayValidationError(
                    f"unknown tracking provider {parcel.provider!r}; use one of "
                    f"{', '.join(sorted(TRACKING_PROVIDERS))}"
                )
            _text(parcel.code, "tracking code")
        if invoicing is not None:
            check_invoicing(invoicing, ZoneInfo(self.settings.time_zone))
        root, _ = self._envelope(
            op, transaction_id=transaction_id, order_id=order_id, tracking=parcels
        )
        w = self.w
        content = w.el(root, "content")
        if invoicing is not None:
            node = w.el(content, "invoicing")
            zone = ZoneInfo(self.settings.time_zone)
            w.opt(node, "invoice-id", invoicing.invoice_id)
            for tag, when in (
                ("invoice-date", invoicing.invoice_date),
                ("delivery-date", invoicing.delivery_date),
                ("due-date", invoicing.due_date),
            ):
                if when is not None:
                    w.el(node, tag, _dt(when, zone))
        self._basket(content, basket, amount)
        return BuiltRequest(op, None, transaction_id, order_id, root)

    def payment_change(
        self,
        subtype: ChangeSubtype,
        transaction_id: str,
        basket: Basket | None,
        *,
        order_id: str | None = None,
        currency: str = "EUR",
    ) -> BuiltRequest:
        """PAYMENT_CHANGE with the delta basket; ``basket=None`` is the documented full form
        (empty basket, amount 0.00) for cancellation and return only."""
        op = Operation.PAYMENT_CHANGE
        transaction_id = _check_transaction_id(transaction_id, op)
        full = basket is None
        if basket is None:
            if subtype not in (ChangeSubtype.CANCELLATION, ChangeSubtype.RETURN):
                raise RatepayValidationError(f"PAYMENT_CHANGE {subtype} needs a basket")
            basket = Basket(currency=currency)
            amount = Decimal("0")
        elif subtype == ChangeSubtype.CREDIT:
            # credit: a negative <discount> (goodwill credit) or a positive one (debit)
            amount = _check_basket(
                basket,
                f"{op} {subtype}",
                need_item=False,
                allow_negative_amount=True,
                adjustment=True,
            )
        else:
            amount = _check_basket(
                basket, f"{op} {subtype}", need_item=subtype == ChangeSubtype.CHANGE_ORDER
            )
        root, _ = self._envelope(
            op, subtype=subtype.value, transaction_id=transaction_id, order_id=order_id
        )
        content = self.w.el(root, "content")
        self._basket(content, basket, amount, full=full)
        return BuiltRequest(op, subtype.value, transaction_id, order_id, root)

    def profile_request(self) -> BuiltRequest:
        root, _ = self._envelope(Operation.PROFILE_REQUEST)
        return BuiltRequest(Operation.PROFILE_REQUEST, None, None, None, root)

    def configuration_request(self) -> BuiltRequest:
        root, _ = self._envelope(Operation.CONFIGURATION_REQUEST)
        return BuiltRequest(Operation.CONFIGURATION_REQUEST, None, None, None, root)

    def calculation_request(
        self,
        amount: Decimal,
        *,
        rate: Decimal | None = None,
        months: int | None = None,
        payment_firstday: int | None = None,
        order_ref: str | None = None,
    ) -> BuiltRequest:
        op = Operation.CALCULATION_REQUEST
        if _money(amount, "instalment amount") <= 0:
            raise RatepayValidationError("instalment amount must be positive")
        if (rate is None) == (months is None):
            raise RatepayValidationError("give either rate (by rate) or months (by time)")
        if rate is not None:
            subtype = CalculationSubtype.BY_RATE
            if _money(rate, "instalment rate") <= 0:
                raise RatepayValidationError("instalment rate must be positive")
        else:
            subtype = CalculationSubtype.BY_TIME
            if isinstance(months, bool) or not isinstance(months, int) or months < 1:
                raise RatepayValidationError("instalment months must be a whole number ≥ 1")
        root, _ = self._envelope(op, subtype=subtype.value)
        w = self.w
        calc = w.el(w.el(root, "content"), "installment-calculation")
        w.el(calc, "amount", format_amount(amount))
        if rate is not None:
            w.el(w.el(calc, "calculation-rate"), "rate", format_amount(rate))
        else:
            w.el(w.el(calc, "calculation-time"), "month", str(months))
        if payment_firstday is not None:
            w.el(calc, "payment-firstday", str(payment_firstday))
        return BuiltRequest(op, subtype.value, None, order_ref, root)
