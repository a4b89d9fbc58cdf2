"""The instalment calculator for checkout, and the one place a plan for a PAYMENT_REQUEST is made.

A shop shows the shopper a plan before the order is placed (``Engine.calculate_installment``,
``ratepay-oms installment calc``); the PAYMENT_REQUEST of an INSTALLMENT order later asks for
its plan with the same inputs (amount = the basket amount, months or rate, first debit day)
through the same function (``quote``). RatePAY's calculator is a function of those inputs and
the profile's configuration, so the plan the shopper saw is the plan sent — unless the profile's
conditions changed in between, and then the new plan is the one RatePAY would accept anyway.

Only result 502 with reason 603 (conditions fulfilled) or an "adjusted" reason (671, 688, 689,
695–699) is a usable plan (reference §4.9); for an adjusted plan RatePAY's reason text must be
shown to the shopper (``InstallmentQuote.notice``). Anything else raises
``InstallmentUnavailable`` with RatePAY's codes and texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ratepay_oms.engine.plugins import INSTALLMENT_SERVICE
from ratepay_oms.errors import OmsError
from ratepay_oms.orders import DEFAULT_PAYMENT_FIRSTDAY
from ratepay_oms.ratepay import InstallmentDetails, InstallmentPlan, RatepayFacade, RatepayResult

SERVICE_NAME = INSTALLMENT_SERVICE
"""Key of the calculator in the engine's ``services`` (``Engine.calculate_installment``)."""

CONDITIONS_FULFILLED = 603


class InstallmentUnavailable(OmsError):
    """RatePAY offers no usable plan for this amount and choice; the message says why."""

    def __init__(self, message: str, result: RatepayResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class InstallmentQuote:
    """A usable plan as RatePAY calculated it, and what a PAYMENT_REQUEST sends from it."""

    plan: InstallmentPlan
    reason_code: int
    reason_text: str

    @property
    def adjusted(self) -> bool:
        """RatePAY changed the rate or runtime asked for: show ``notice`` to the shopper."""
        return self.reason_code != CONDITIONS_FULFILLED

    @property
    def notice(self) -> str | None:
        return self.reason_text if self.adjusted else None

    @property
    def details(self) -> InstallmentDetails:
        """``payment/installment-details`` of the PAYMENT_REQUEST, unchanged from the plan."""
        return InstallmentDetails.from_plan(self.plan)

    def to_dict(self) -> dict[str, Any]:
        plan = {k: (str(v) if isinstance(v, Decimal) else v) for k, v in vars(self.plan).items()}
        return {
            "plan": plan,
            "reason_code": self.reason_code,
            "reason_text": self.reason_text,
            "adjusted": self.adjusted,
        }


def quote(
    facade: RatepayFacade,
    amount: Decimal,
    *,
    months: int | None = None,
    rate: Decimal | None = None,
    payment_firstday: int | None = DEFAULT_PAYMENT_FIRSTDAY,
    order_ref: str | None = None,
) -> InstallmentQuote:
    """CALCULATION_REQUEST by time (``months``) or by rate (``rate``) for ``amount``;
    ``order_ref`` files the call under an order in the API log (an order's own plan)."""
    if (months is None) == (rate is None):
        raise InstallmentUnavailable("give either months or a monthly rate, not both")
    if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
        raise InstallmentUnavailable("the amount must be a positive Decimal")
    if months is not None and months < 1:
        raise InstallmentUnavailable("months must be at least 1")
    if rate is not None and (not rate.is_finite() or rate <= 0):
        raise InstallmentUnavailable("the monthly rate must be positive")
    result = facade.installment_calculation(
        amount, rate=rate, months=months, payment_firstday=payment_firstday, order_ref=order_ref
    )
    return from_result(result)


def from_result(result: RatepayResult) -> InstallmentQuote:
    """The quote of a CALCULATION_REQUEST answer, or ``InstallmentUnavailable``."""
    if not result.success or result.installment_plan is None or result.reason_code is None:
        codes = "/".join(str(c) for c in (result.result_code, result.reason_code) if c)
        why = result.reason_text or result.result_text or "no plan in the answer"
        raise InstallmentUnavailable(
            f"RatePAY offers no usable instalment plan ({codes or 'no codes'}): {why}", result
        )
    return InstallmentQuote(result.installment_plan, result.reason_code, result.reason_text or "")


class InstallmentCalculator:
    """The service behind ``Engine.calculate_installment`` (one facade, no database)."""

    def __init__(self, facade: RatepayFacade) -> None:
        self.facade = facade

    def __call__(
        self,
        amount: Decimal,
        *,
        months: int | None = None,
        rate: Decimal | None = None,
        payment_firstday: int | None = DEFAULT_PAYMENT_FIRSTDAY,
    ) -> InstallmentQuote:
        return quote(
            self.facade, amount, months=months, rate=rate, payment_firstday=payment_firstday
        )
