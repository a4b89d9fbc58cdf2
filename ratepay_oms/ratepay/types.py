"""Typed inputs and results of the RatePAY facade.

Inputs are plain frozen dataclasses: the OMS commands map orders onto them, the request
builders validate and serialise them. Money is ``Decimal``; a float is refused by the builders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from ratepay_oms.ratepay.codes import RESULT_PROCESSING_FAILED, Status, is_decline
from ratepay_oms.ratepay.status_api import StatusReport
from ratepay_oms.ratepay.xml import format_amount

# --- inputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A postal address. ``first_name``/``last_name``/``company`` are sent for DELIVERY only."""

    street: str
    zip_code: str
    city: str
    country_code: str
    street_number: str | None = None
    street_additional: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    company: str | None = None
    delivery_type: str | None = None
    """``@delivery-type`` of a DELIVERY address (``codes.DeliveryType``); ``None`` = ADDRESS."""


@dataclass(frozen=True)
class BankAccount:
    """SEPA data for ELV and INSTALLMENT with DIRECT-DEBIT: owner plus IBAN (BIC optional)."""

    owner: str
    iban: str
    bic: str | None = None
    bank_name: str | None = None


@dataclass(frozen=True)
class Customer:
    first_name: str
    last_name: str
    email: str
    billing_address: Address
    gender: str = "U"
    date_of_birth: date | None = None
    phone: str | None = None
    mobile: str | None = None
    ip_address: str | None = None
    nationality: str | None = None
    language: str | None = None
    delivery_address: Address | None = None
    bank_account: BankAccount | None = None
    company_name: str | None = None
    vat_id: str | None = None
    company_id: str | None = None
    registry_location: str | None = None
    company_type: str | None = None
    homepage: str | None = None
    allow_credit_inquiry: bool = True


@dataclass(frozen=True)
class BasketItem:
    """One basket line; ``discount`` is per unit and must be ≤ 0."""

    article_number: str
    name: str
    quantity: int
    unit_price_gross: Decimal
    tax_rate: Decimal
    discount: Decimal = Decimal("0")
    unique_article_number: str | None = None
    category: str | None = None
    description_addition: str | None = None

    @property
    def key(self) -> str:
        """The position key the gateway tracks (article-number [+ unique-article-number])."""
        if self.unique_article_number:
            return f"{self.article_number}/{self.unique_article_number}"
        return self.article_number

    @property
    def total(self) -> Decimal:
        return (self.unit_price_gross + self.discount) * self.quantity


@dataclass(frozen=True)
class BasketPosition:
    """The special ``shipping`` or ``discount`` position (a discount's price is negative)."""

    unit_price_gross: Decimal
    tax_rate: Decimal
    name: str
    description_addition: str | None = None


@dataclass(frozen=True)
class Basket:
    items: Sequence[BasketItem] = ()
    currency: str = "EUR"
    shipping: BasketPosition | None = None
    discount: BasketPosition | None = None

    @property
    def amount(self) -> Decimal:
        """Σ (unit-price-gross + discount) × quantity + shipping + discount, two places."""
        total = sum((item.total for item in self.items), Decimal("0"))
        if self.shipping is not None:
            total += self.shipping.unit_price_gross
        if self.discount is not None:
            total += self.discount.unit_price_gross
        return Decimal(format_amount(total))

    @property
    def is_empty(self) -> bool:
        return not self.items and self.shipping is None and self.discount is None


@dataclass(frozen=True)
class InstallmentDetails:
    """The plan the shopper accepted, unchanged from ``installment_calculation``."""

    total_amount: Decimal
    number_of_rates: int
    rate: Decimal
    last_rate: Decimal
    interest_rate: Decimal
    payment_firstday: int

    @classmethod
    def from_plan(cls, plan: InstallmentPlan) -> InstallmentDetails:
        return cls(
            total_amount=plan.total_amount,
            number_of_rates=plan.number_of_rates,
            rate=plan.rate,
            last_rate=plan.last_rate,
            interest_rate=plan.interest_rate,
            payment_firstday=plan.payment_firstday,
        )


@dataclass(frozen=True)
class PaymentInfo:
    """Payment method and, for INSTALLMENT, the plan and debit pay type.

    ``payment/amount`` is the basket amount, except for INSTALLMENT where it is the plan's
    total (goods + interest + service charge).
    """

    method: str
    installment: InstallmentDetails | None = None
    debit_pay_type: str | None = None


@dataclass(frozen=True)
class Invoicing:
    """CONFIRMATION_DELIVER ``invoicing``. Dates are sent in the shop's ``TIME_ZONE``: an aware
    datetime is converted, a naive one is UTC, a ``date`` is that day."""

    invoice_id: str | None = None
    invoice_date: datetime | date | None = None
    delivery_date: datetime | date | None = None
    due_date: datetime | date | None = None


@dataclass(frozen=True)
class Tracking:
    """A parcel tracking code; provider is one of ``codes.TRACKING_PROVIDERS``."""

    provider: str
    code: str


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """What went over the wire for one call (security code already masked)."""

    operation: str
    subtype: str | None
    request_xml: str
    response_xml: str | None
    http_status: int | None
    duration_ms: int
    transaction_id: str | None = None
    order_ref: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class InstallmentPlan:
    total_amount: Decimal
    amount: Decimal
    interest_amount: Decimal
    service_charge: Decimal
    interest_rate: Decimal
    annual_percentage_rate: Decimal
    monthly_debit_interest: Decimal
    number_of_rates: int
    rate: Decimal
    last_rate: Decimal
    payment_firstday: int


@dataclass(frozen=True)
class RatepayResult:
    """The gateway's answer to one operation.

    ``success`` is status OK **and** the operation's own success result code. A decline (401)
    and a processing failure (150) are results, not exceptions: the caller decides.
    """

    success: bool
    operation: str
    subtype: str | None
    status_code: str | None
    status_text: str | None
    reason_code: int | None
    reason_text: str | None
    result_code: int | None
    result_text: str | None
    customer_message: str | None
    transaction_id: str | None
    transaction_short_id: str | None
    response_type: str | None
    exchange: Exchange
    descriptor: str | None = None
    payment_method: str | None = None
    payment_amount: Decimal | None = None
    products: tuple[str, ...] = ()
    installment_plan: InstallmentPlan | None = None
    installment_configuration: dict[str, str] = field(default_factory=dict)
    master_data: dict[str, str] = field(default_factory=dict)

    @property
    def declined(self) -> bool:
        """Rejected by risk or contract (result 401, or 150 with reason 730 "buyer
        identity"): show ``customer_message``, offer another method."""
        return is_decline(self.result_code, self.reason_code)

    @property
    def failed(self) -> bool:
        """Technical or validation failure (status not OK, or result 150), not a decline."""
        return not self.success and not self.declined and (
            self.status_code != Status.OK or self.result_code == RESULT_PROCESSING_FAILED
        )


@dataclass(frozen=True)
class TransactionStatus:
    """What the Transaction Status API reports for a transaction: its JSON as returned
    (``data``, empty for a 404) and the typed reading reconciliation works on (``report``)."""

    transaction_id: str
    data: dict[str, Any]
    exchange: Exchange
    report: StatusReport
