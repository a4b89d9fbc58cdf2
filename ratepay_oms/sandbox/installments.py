"""Instalment plans for CONFIGURATION_REQUEST / CALCULATION_REQUEST.

RatePAY does not publish its calculator, so the sandbox uses a plain annuity that produces the
same *shape* of answer (reference §4.9, §8.10):

* monthly interest ``i = interest-rate / 12 / 100`` (nominal annual rate, monthly compounding);
  ``monthly-debit-interest = i × 100`` rounded to two places;
* annuity on the goods amount ``A = amount × i / (1 − (1 + i)^−n)`` (``A = amount / n`` when
  ``i = 0``); ``interest-amount = A × n − amount``, rounded half up to cents;
* ``total-amount = amount + interest-amount + service-charge`` (the service charge is not
  financed, as in RatePAY's recorded plans where total = amount + interest + charge);
* ``rate = total / n`` rounded **up** to the cent, ``last-rate = total − (n − 1) × rate``
  (so the last rate is the smaller one, like RatePAY's 21.04 / 20.96);
* ``annual-percentage-rate``: the effective annual rate ``(1 + m)^12 − 1`` of the monthly rate
  ``m`` at which the actual rates repay ``amount`` (bisection, Decimal), two places.

For RatePAY's recorded example (230.00, 12 months, 13.7 %, charge 3.95) this gives 251.37 in
total (RatePAY: 252.40): close, not identical; the sandbox is not a price calculator.
All arithmetic is Decimal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, localcontext

logger = logging.getLogger(__name__)

CENT = Decimal("0.01")


@dataclass(frozen=True)
class InstallmentConfig:
    """The instalment conditions of the sandbox profile (CONFIGURATION_REQUEST's answer)."""

    interest_rate_min: Decimal = Decimal("0.00")
    interest_rate_default: Decimal = Decimal("13.70")
    interest_rate_max: Decimal = Decimal("17.90")
    month_allowed: tuple[int, ...] = (3, 6, 12, 18, 24, 36, 48)
    valid_payment_firstdays: tuple[int, ...] = (2, 28)
    payment_firstday: int = 28
    service_charge: Decimal = Decimal("3.95")
    rate_min: Decimal = Decimal("20.00")
    amount_min: Decimal = Decimal("200.00")
    amount_max: Decimal = Decimal("3500.00")

    @property
    def month_min(self) -> int:
        return min(self.month_allowed)

    @property
    def month_max(self) -> int:
        return max(self.month_allowed)


@dataclass(frozen=True)
class InstallmentPlan:
    amount: Decimal
    number_of_rates: int
    rate: Decimal
    last_rate: Decimal
    interest_rate: Decimal
    interest_amount: Decimal
    service_charge: Decimal
    total_amount: Decimal
    monthly_debit_interest: Decimal
    annual_percentage_rate: Decimal
    payment_firstday: int
    reason_code: int = 603


class CalculationFailed(Exception):
    """The request can't produce any plan (RatePAY answers result 503 with this reason)."""

    def __init__(self, reason_code: int) -> None:
        super().__init__(reason_code)
        self.reason_code = reason_code


def _cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def plan_for_months(
    amount: Decimal,
    months: int,
    interest_rate: Decimal,
    config: InstallmentConfig,
    payment_firstday: int | None = None,
    reason_code: int = 603,
) -> InstallmentPlan:
    """The plan for ``months`` rates (see the module docstring for the formula)."""
    with localcontext() as ctx:
        ctx.prec = 34
        i = interest_rate / Decimal(1200)
        annuity = amount / months if i == 0 else amount * i / (1 - (1 + i) ** (-months))
        interest = _cents(annuity * months - amount)
        total = amount + interest + config.service_charge
        rate = (total / months).quantize(CENT, rounding=ROUND_CEILING)
        last = total - rate * (months - 1)
        apr = _apr(amount, months, rate, last)
    return InstallmentPlan(
        amount=amount,
        number_of_rates=months,
        rate=rate,
        last_rate=last,
        interest_rate=interest_rate,
        interest_amount=interest,
        service_charge=config.service_charge,
        total_amount=total,
        monthly_debit_interest=_cents(i * 100),
        annual_percentage_rate=apr,
        payment_firstday=payment_firstday or config.payment_firstday,
        reason_code=reason_code,
    )


def _apr(amount: Decimal, months: int, rate: Decimal, last: Decimal) -> Decimal:
    def present_value(m: Decimal) -> Decimal:
        q = 1 + m
        pv = sum((rate / q**k for k in range(1, months)), Decimal(0))
        return pv + last / q**months

    low, high = Decimal(0), Decimal(1)
    if present_value(low) <= amount:
        return Decimal("0.00")
    for _ in range(80):
        mid = (low + high) / 2
        if present_value(mid) > amount:
            low = mid
        else:
            high = mid
    return _cents(((1 + low) ** 12 - 1) * 100)


def _check_amount(amount: Decimal, config: InstallmentConfig) -> None:
    if amount < config.amount_min:
        raise CalculationFailed(650)
    if amount > config.amount_max:
        raise CalculationFailed(651)


def by_time(
    amount: Decimal,
    months: int,
    config: InstallmentConfig,
    interest_rate: Decimal | None = None,
    payment_firstday: int | None = None,
) -> InstallmentPlan:
    """calculation-by-time: runtime outside the allowed range is moved to it (698/699), a
    runtime between allowed values to the next longer allowed one (697)."""
    _check_amount(amount, config)
    rate = config.interest_rate_default if interest_rate is None else interest_rate
    if not config.interest_rate_min <= rate <= config.interest_rate_max:
        raise CalculationFailed(652)
    reason = 603
    if months < config.month_min:
        months, reason = config.month_min, 699
    elif months > config.month_max:
        months, reason = config.month_max, 698
    elif months not in config.month_allowed:
        months, reason = min(m for m in config.month_allowed if m > months), 697
    plan = plan_for_months(amount, months, rate, config, payment_firstday, reason)
    if plan.rate < config.rate_min:
        # Too small a rate for this runtime: shorten to the longest runtime that meets rate_min.
        for m in sorted(config.month_allowed, reverse=True):
            shorter = plan_for_months(amount, m, rate, config, payment_firstday, 689)
            if shorter.rate >= config.rate_min:
                return shorter
        raise CalculationFailed(689)
    return plan


def by_rate(
    amount: Decimal,
    wanted_rate: Decimal,
    config: InstallmentConfig,
    interest_rate: Decimal | None = None,
    payment_firstday: int | None = None,
) -> InstallmentPlan:
    """calculation-by-rate: the shortest allowed runtime whose rate is at most ``wanted_rate``.

    A wanted rate above the shortest runtime's rate gives that plan (695, rate lowered); one
    below the longest runtime's rate gives the longest plan (696, rate raised); otherwise the
    chosen plan's rate differs from the wish and RatePAY says so with 697, unless equal (603).
    """
    _check_amount(amount, config)
    rate = config.interest_rate_default if interest_rate is None else interest_rate
    if not config.interest_rate_min <= rate <= config.interest_rate_max:
        raise CalculationFailed(652)
    if wanted_rate < config.rate_min:
        wanted_rate = config.rate_min
    months = sorted(config.month_allowed)
    plans = [plan_for_months(amount, m, rate, config, payment_firstday) for m in months]
    if wanted_rate >= plans[0].rate:
        return _with_reason(plans[0], 603 if wanted_rate == plans[0].rate else 695)
    for plan in plans:
        if plan.rate <= wanted_rate:
            return _with_reason(plan, 603 if plan.rate == wanted_rate else 697)
    return _with_reason(plans[-1], 696)


def _with_reason(plan: InstallmentPlan, reason: int) -> InstallmentPlan:
    return replace(plan, reason_code=reason)
