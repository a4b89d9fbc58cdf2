"""The order file every entry point accepts (``order place``, ``Engine.place_order``, the demo).

An order arrives as JSON (see ``examples/order-invoice.json`` in the shared docs) and is
checked here once, completely, before anything is written: a shop that sends a broken order
gets one message naming the field (``items[1].unit_price_gross: …``) and nothing is stored.

Money is ``Decimal`` with at most two places. JSON numbers are read as ``Decimal``
(``parse_float=Decimal``), and a Python ``float`` handed to ``parse_order`` is refused, because
a float has already lost the cent it was meant to carry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ratepay_oms.errors import OmsError
from ratepay_oms.ratepay.profiles import PROFILE_NAME
from ratepay_oms.sepa import (
    bic_problem,
    iban_problem,
    mandate_reference_problem,
    normalise_iban,
)

CENT = Decimal("0.01")
ORDER_REF_MAX = 50
"""RatePAY's ``external/order-id`` holds at most 50 characters."""
DELIVERY_TYPES = ("ADDRESS", "IN_STORE_COLLECT", "PICK_UP_BOX", "PICK_UP_SHOP")
"""``address/@delivery-type``; anything but ADDRESS must be contracted with RatePAY."""
B2B_FIELDS = ("vat_id", "company_id", "registry_location", "company_type", "homepage")
"""Company details RatePAY takes only together with ``company_name``."""
PAYMENT_METHODS = ("INVOICE", "ELV", "PREPAYMENT", "INSTALLMENT")
CALCULATION_TYPES = ("calculation-by-rate", "calculation-by-time")
DEBIT_PAY_TYPES = ("DIRECT-DEBIT", "BANK-TRANSFER")
DEFAULT_PAYMENT_FIRSTDAY = 28
"""Day of the month of the instalment debits when the order does not say (RatePAY's usual)."""
CURRENCIES = ("EUR", "CHF", "AUD", "CAD", "GBP", "JPY", "RUB", "USD")
GENDERS = ("M", "F", "U")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_DEVICE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,255}")
"""RatePAY's device token: a UUID or letters, digits, ``_`` and ``-``."""
_HOMEPAGE = re.compile(r"https?://[^\s/$.?#][^\s]*", re.IGNORECASE)


class OrderInputError(OmsError):
    """The order data is incomplete or wrong; the message names the field."""


def money(value: Decimal) -> Decimal:
    """Round to cents as RatePAY does (half up)."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Address:
    street: str
    zip_code: str
    city: str
    country_code: str
    street_additional: str | None = None
    street_number: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    company: str | None = None
    delivery_type: str | None = None
    """A delivery address's kind (``DELIVERY_TYPES``); ``None`` = ADDRESS."""


@dataclass(frozen=True)
class BankAccount:
    owner: str
    iban: str
    bic: str | None = None
    bank_name: str | None = None
    mandate_reference: str | None = None
    """The SEPA mandate reference for the direct debit, kept and shown (not sent: the XML
    API has no field for it)."""


@dataclass(frozen=True)
class CustomerInput:
    customer_ref: str | None
    first_name: str
    last_name: str
    gender: str
    email: str
    billing_address: Address
    date_of_birth: date | None = None
    phone: str | None = None
    mobile: str | None = None
    ip_address: str | None = None
    language: str | None = None
    delivery_address: Address | None = None
    company_name: str | None = None
    vat_id: str | None = None
    bank_account: BankAccount | None = None
    company_id: str | None = None
    registry_location: str | None = None
    company_type: str | None = None
    homepage: str | None = None

    @property
    def is_b2b(self) -> bool:
        return self.company_name is not None


@dataclass(frozen=True)
class LineInput:
    """One order line; the engine splits it into ``quantity`` item rows."""

    sku: str
    name: str
    quantity: int
    unit_price_gross: Decimal
    tax_rate: Decimal
    discount: Decimal = Decimal("0.00")
    """Per unit, zero or negative, as RatePAY's ``item/@discount``."""
    category: str | None = None

    @property
    def unit_total(self) -> Decimal:
        return self.unit_price_gross + self.discount

    @property
    def total(self) -> Decimal:
        return money(self.unit_total * self.quantity)


@dataclass(frozen=True)
class PositionInput:
    """Shipping costs or the order discount: a position of its own at RatePAY."""

    name: str
    unit_price_gross: Decimal
    tax_rate: Decimal


@dataclass(frozen=True)
class InstallmentInput:
    """What the shopper chose in the installment calculator (CALCULATION_REQUEST input)."""

    calculation_type: str
    value: Decimal
    """The monthly rate (by rate) or the number of months (by time)."""
    payment_firstday: int = DEFAULT_PAYMENT_FIRSTDAY
    debit_pay_type: str = "BANK-TRANSFER"


@dataclass(frozen=True)
class PaymentInput:
    method: str
    installment: InstallmentInput | None = None
    profile: str | None = None
    """The RatePAY profile to use (a name from ``[ratepay.profiles.<NAME>]``); without it the
    profile is chosen by billing country and currency."""


@dataclass(frozen=True)
class OrderInput:
    order_ref: str
    process: str
    currency: str
    customer: CustomerInput
    items: tuple[LineInput, ...]
    payment: PaymentInput
    shipping: PositionInput | None = None
    discount: PositionInput | None = None
    device_token: str | None = None

    @property
    def goods_total(self) -> Decimal:
        """Σ (unit price + unit discount) × quantity over the lines."""
        return money(sum((line.total for line in self.items), Decimal("0")))

    @property
    def basket_amount(self) -> Decimal:
        """The basket amount as RatePAY defines it: lines + shipping + order discount."""
        total = self.goods_total
        if self.shipping is not None:
            total += self.shipping.unit_price_gross
        if self.discount is not None:
            total += self.discount.unit_price_gross
        return money(total)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (money as strings) that ``parse_order`` reads back unchanged."""
        data: dict[str, Any] = _to_jsonable(self)
        return data


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    if isinstance(obj, date):
        return obj.isoformat()
    if isinstance(obj, tuple | list):
        return [_to_jsonable(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return {
            name: _to_jsonable(getattr(obj, name))
            for name in obj.__dataclass_fields__
            if getattr(obj, name) is not None
        }
    return obj


# --- parsing -------------------------------------------------------------------------------


class _Reader:
    """Reads one JSON object, remembering the path for error messages."""

    def __init__(self, data: Any, path: str) -> None:
        if data.__class__ is not dict and not isinstance(data, Mapping):  # dict: no ABC check
            raise OrderInputError(f"{path or 'order'}: expected an object, got {_kind(data)}")
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, *, required: bool) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None and required:
            raise OrderInputError(f"{self._at(key)}: missing")
        return value

    def text(self, key: str, *, required: bool = True, max_len: int = 255) -> str | None:
        self.used.add(key)  # raw(), inlined: the order's most called reader (40 a parse)
        value = self.data.get(key)
        if value is None:
            if required:
                raise OrderInputError(f"{self._at(key)}: missing")
            return None
        if not isinstance(value, str):
            raise OrderInputError(f"{self._at(key)}: expected text, got {_kind(value)}")
        value = value.strip()
        if not value and required:
            raise OrderInputError(f"{self._at(key)}: must not be empty")
        if len(value) > max_len:
            raise OrderInputError(f"{self._at(key)}: longer than {max_len} characters")
        return value or None

    def req_text(self, key: str, max_len: int = 255) -> str:
        value = self.text(key, required=True, max_len=max_len)
        assert value is not None
        return value

    def choice(self, key: str, choices: tuple[str, ...], *, default: str | None = None) -> str:
        value = self.text(key, required=default is None)
        if value is None:
            assert default is not None
            return default
        if value not in choices:
            raise OrderInputError(
                f"{self._at(key)}: {value!r} is not one of {', '.join(choices)}"
            )
        return value

    def decimal(
        self, key: str, *, required: bool = True, places: int = 2, default: Decimal | None = None
    ) -> Decimal:
        value = self.raw(key, required=required and default is None)
        if value is None:
            assert default is not None
            return default
        return _decimal(value, self, key, places)

    def integer(self, key: str, *, default: int | None = None) -> int:
        value = self.raw(key, required=default is None)
        if value is None:
            assert default is not None
            return default
        if value.__class__ is int:  # what JSON gives for a whole number: nothing to check
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
            raise OrderInputError(f"{self._at(key)}: expected a whole number, got {_kind(value)}")
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            raise OrderInputError(f"{self._at(key)}: not a whole number: {value!r}") from None
        if not number.is_finite() or number != number.to_integral_value():
            raise OrderInputError(f"{self._at(key)}: not a whole number: {value!r}")
        return int(number)

    def child(self, key: str, *, required: bool = True) -> _Reader | None:
        value = self.raw(key, required=required)
        return None if value is None else _Reader(value, self._at(key))

    def finish(self) -> None:
        if self.used.issuperset(self.data):
            return
        unknown = sorted(set(self.data) - self.used)
        raise OrderInputError(f"{self._at(unknown[0])}: unknown field")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false"}.get(
        type(value), type(value).__name__
    )


_AMOUNT_LIMIT = Decimal("1e9")


class _Quanta(dict[int, Decimal]):
    """``places`` → the quantum (``2`` → ``Decimal("0.01")``), each made once."""

    def __missing__(self, places: int) -> Decimal:
        quantum = self[places] = Decimal(1).scaleb(-places)
        return quantum


_QUANTA = _Quanta()


def _decimal(value: Any, r: _Reader, key: str, places: int) -> Decimal:
    """``value`` of ``r``'s ``key`` as a Decimal of ``places`` places. A Decimal (what JSON
    numbers are read as) is taken as it is: ``Decimal(str(d))`` is ``d``."""
    if isinstance(value, float):
        raise OrderInputError(f"{r._at(key)}: give amounts as text or decimal, not as a float")
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise OrderInputError(f"{r._at(key)}: expected a decimal amount, got {_kind(value)}")
    if isinstance(value, Decimal):
        number = value
    else:
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            raise OrderInputError(f"{r._at(key)}: not a decimal amount: {value!r}") from None
    if not number.is_finite():
        raise OrderInputError(f"{r._at(key)}: not a decimal amount: {value!r}")
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > places:
        raise OrderInputError(f"{r._at(key)}: more than {places} decimal places: {value!r}")
    if abs(number) >= _AMOUNT_LIMIT:
        raise OrderInputError(f"{r._at(key)}: amount out of range: {value!r}")
    return number.quantize(_QUANTA[places])


def _address(r: _Reader, *, delivery: bool = False) -> Address:
    country = r.req_text("country_code").upper()
    if not _COUNTRY.match(country):
        raise OrderInputError(f"{r._at('country_code')}: expected an ISO country code like DE")
    address = Address(
        street=r.req_text("street", 100),
        zip_code=r.req_text("zip_code", 10),
        city=r.req_text("city"),
        country_code=country,
        street_additional=r.text("street_additional", required=False),
        street_number=r.text("street_number", required=False),
        first_name=r.text("first_name", required=False),
        last_name=r.text("last_name", required=False),
        company=r.text("company", required=False),
        delivery_type=_delivery_type(r, delivery),
    )
    r.finish()
    return address


def _delivery_type(r: _Reader, delivery: bool) -> str | None:
    kind = r.text("delivery_type", required=False)
    if kind is None:
        return None
    if kind not in DELIVERY_TYPES:
        raise OrderInputError(f"{r._at('delivery_type')}: {kind!r} is not one of "
                              f"{', '.join(DELIVERY_TYPES)}")
    if not delivery and kind != "ADDRESS":
        raise OrderInputError(
            f"{r._at('delivery_type')}: a billing address is not a pick-up location"
        )
    return None if kind == "ADDRESS" else kind


def _bank_account(bank: _Reader) -> BankAccount:
    iban = normalise_iban(bank.req_text("iban", 42))
    problem = iban_problem(iban)
    if problem:
        raise OrderInputError(f"{bank._at('iban')}: {problem}")
    bic = bank.text("bic", required=False)
    if bic is not None:
        bic = "".join(bic.split()).upper()
        problem = bic_problem(bic)
        if problem:
            raise OrderInputError(f"{bank._at('bic')}: {problem}")
    mandate = bank.text("mandate_reference", required=False, max_len=35)
    if mandate is not None:
        problem = mandate_reference_problem(mandate)
        if problem:
            raise OrderInputError(f"{bank._at('mandate_reference')}: {problem}")
    account = BankAccount(
        owner=bank.req_text("owner"),
        iban=iban,
        bic=bic,
        bank_name=bank.text("bank_name", required=False),
        mandate_reference=mandate,
    )
    bank.finish()
    return account


def _customer(r: _Reader) -> CustomerInput:
    birth = r.text("date_of_birth", required=False)
    date_of_birth = None
    if birth is not None:
        try:
            date_of_birth = date.fromisoformat(birth)
        except ValueError:
            raise OrderInputError(f"{r._at('date_of_birth')}: expected YYYY-MM-DD") from None
    email = r.req_text("email")
    if not _EMAIL.match(email):
        raise OrderInputError(f"{r._at('email')}: not an e-mail address: {email!r}")
    billing = r.child("billing_address")
    delivery = r.child("delivery_address", required=False)
    bank = r.child("bank_account", required=False)
    bank_account = _bank_account(bank) if bank is not None else None
    homepage = r.text("homepage", required=False)
    if homepage is not None and not _HOMEPAGE.fullmatch(homepage):
        raise OrderInputError(f"{r._at('homepage')}: expected an http(s) address")
    customer = CustomerInput(
        customer_ref=r.text("customer_ref", required=False),
        first_name=r.req_text("first_name"),
        last_name=r.req_text("last_name"),
        gender=r.choice("gender", GENDERS, default="U"),
        email=email,
        billing_address=_address(billing) if billing else _never(),
        date_of_birth=date_of_birth,
        phone=r.text("phone", required=False),
        mobile=r.text("mobile", required=False),
        ip_address=r.text("ip_address", required=False),
        language=r.text("language", required=False),
        delivery_address=_address(delivery, delivery=True) if delivery else None,
        company_name=r.text("company_name", required=False),
        vat_id=r.text("vat_id", required=False),
        bank_account=bank_account,
        company_id=r.text("company_id", required=False),
        registry_location=r.text("registry_location", required=False),
        company_type=r.text("company_type", required=False),
        homepage=homepage,
    )
    if customer.company_name is None:
        for name in B2B_FIELDS:
            if getattr(customer, name) is not None:
                raise OrderInputError(f"{r._at(name)}: only for a company (set company_name)")
    if customer.company_name is None and customer.date_of_birth is None:
        raise OrderInputError(f"{r._at('date_of_birth')}: missing (required for consumers)")
    r.finish()
    return customer


def _never() -> Any:  # pragma: no cover - _Reader.child(required=True) raised already
    raise AssertionError


def _line(r: _Reader) -> LineInput:
    quantity = r.integer("quantity")
    if quantity < 1:
        raise OrderInputError(f"{r._at('quantity')}: must be at least 1, got {quantity}")
    if quantity > 10_000:
        raise OrderInputError(f"{r._at('quantity')}: more than 10000 units on one line")
    price = r.decimal("unit_price_gross")
    if price < 0:
        raise OrderInputError(f"{r._at('unit_price_gross')}: must not be negative")
    discount = r.decimal("discount", default=Decimal("0.00"))
    if discount > 0:
        raise OrderInputError(f"{r._at('discount')}: a discount is zero or negative")
    if price + discount < 0:
        raise OrderInputError(f"{r._at('discount')}: larger than the unit price")
    line = LineInput(
        sku=r.req_text("sku"),
        name=r.req_text("name"),
        quantity=quantity,
        unit_price_gross=price,
        tax_rate=_tax_rate(r),
        discount=discount,
        category=r.text("category", required=False, max_len=511),
    )
    r.finish()
    return line


def _tax_rate(r: _Reader) -> Decimal:
    rate = r.decimal("tax_rate")
    if not Decimal(0) <= rate < Decimal(100):
        raise OrderInputError(f"{r._at('tax_rate')}: a percentage between 0 and 100")
    return rate


def _position(r: _Reader, *, negative: bool) -> PositionInput:
    price = r.decimal("unit_price_gross")
    if negative and price > 0:
        raise OrderInputError(f"{r._at('unit_price_gross')}: an order discount is negative")
    if not negative and price < 0:
        raise OrderInputError(f"{r._at('unit_price_gross')}: shipping costs are not negative")
    position = PositionInput(name=r.req_text("name"), unit_price_gross=price, tax_rate=_tax_rate(r))
    r.finish()
    return position


def _payment(r: _Reader, customer: CustomerInput) -> PaymentInput:
    method = r.choice("method", PAYMENT_METHODS)
    plan = r.child("installment", required=method == "INSTALLMENT")
    installment = None
    if plan is not None:
        if method != "INSTALLMENT":
            raise OrderInputError(f"{plan.path}: only for method INSTALLMENT")
        calculation_type = plan.choice("calculation_type", CALCULATION_TYPES)
        value = plan.decimal("value")
        if value <= 0:
            raise OrderInputError(f"{plan._at('value')}: must be positive")
        installment = InstallmentInput(
            calculation_type=calculation_type,
            value=value,
            payment_firstday=plan.integer("payment_firstday", default=DEFAULT_PAYMENT_FIRSTDAY),
            debit_pay_type=plan.choice("debit_pay_type", DEBIT_PAY_TYPES, default="BANK-TRANSFER"),
        )
        plan.finish()
    needs_bank = method == "ELV" or (
        installment is not None and installment.debit_pay_type == "DIRECT-DEBIT"
    )
    if needs_bank and customer.bank_account is None:
        raise OrderInputError(
            f"customer.bank_account: missing (required for direct debit, method {method})"
        )
    if method == "INSTALLMENT" and customer.is_b2b:
        raise OrderInputError("payment.method: INSTALLMENT is not offered to companies")
    profile = r.text("profile", required=False, max_len=40)
    if profile is not None and not PROFILE_NAME.fullmatch(profile):
        raise OrderInputError(
            f"{r._at('profile')}: a profile name is letters, digits and '-', got {profile!r}"
        )
    r.finish()
    return PaymentInput(method=method, installment=installment, profile=profile)


def parse_order(data: Any) -> OrderInput:
    """Check an order completely and return it typed; raise ``OrderInputError`` otherwise."""
    r = _Reader(data, "")
    order_ref = r.req_text("order_ref", ORDER_REF_MAX)
    process = r.req_text("process")
    currency = r.choice("currency", CURRENCIES).upper()
    customer_reader = r.child("customer")
    assert customer_reader is not None
    customer = _customer(customer_reader)
    raw_items = r.raw("items", required=True)
    if not isinstance(raw_items, list):
        raise OrderInputError(f"items: expected a list, got {_kind(raw_items)}")
    if not raw_items:
        raise OrderInputError("items: an order needs at least one item")
    items = tuple(_line(_Reader(item, f"items[{i}]")) for i, item in enumerate(raw_items))
    shipping = r.child("shipping", required=False)
    discount = r.child("discount", required=False)
    payment = r.child("payment")
    assert payment is not None
    order = OrderInput(
        order_ref=order_ref,
        process=process,
        currency=currency,
        customer=customer,
        items=items,
        payment=_payment(payment, customer),
        shipping=_position(shipping, negative=False) if shipping else None,
        discount=_position(discount, negative=True) if discount else None,
        device_token=_device_token(r),
    )
    r.finish()
    if order.basket_amount < 0:
        raise OrderInputError("discount.unit_price_gross: the order total would be negative")
    return order


def _device_token(r: _Reader) -> str | None:
    token = r.text("device_token", required=False)
    if token is not None and not _DEVICE_TOKEN.fullmatch(token):
        raise OrderInputError(
            "device_token: a UUID or letters, digits, '_' and '-' only (RatePAY's format)"
        )
    return token


def load_order_file(path: str | Path) -> OrderInput:
    """Read and check an order JSON file; syntax errors name line and column."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise OrderInputError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise OrderInputError(f"{file}: not UTF-8 text") from None
    return load_order_text(text, str(file))


def load_order_text(text: str, source: str = "<stdin>") -> OrderInput:
    """Check an order given as JSON text (``order place -`` reads it from stdin); ``source``
    names it in messages."""
    try:
        data = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise OrderInputError(
            f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"
        ) from None
    try:
        return parse_order(data)
    except OrderInputError as exc:
        raise OrderInputError(f"{source}: {exc}") from None
