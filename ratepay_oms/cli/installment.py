"""``ratepay-oms installment calc``: the instalment plan a shopper would get, before the order.

A thin wrapper of ``Engine.calculate_installment`` (one CALCULATION_REQUEST, logged in the API
log like every call): the plan shown here is the one an INSTALLMENT order with the same choice
sends in its PAYMENT_REQUEST. Exit status 0 with a plan, 1 when RatePAY offers none (the message
says why), 2 for a usage mistake.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path

import click
from rich.table import Table

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    engine_from_options,
    engine_options,
    print_json,
    stdout_console,
    translate_db_errors,
)
from ratepay_oms.orders import DEFAULT_PAYMENT_FIRSTDAY


def _amount(ctx: click.Context, param: click.Parameter, value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"not a decimal amount: {value!r}") from None
    exponent = number.as_tuple().exponent
    if not number.is_finite() or number <= 0 or (isinstance(exponent, int) and exponent < -2):
        raise click.BadParameter(f"a positive amount with at most two decimals: {value!r}")
    return number.quantize(Decimal("0.01"))


@cli.group("installment")
def installment() -> None:
    """The RatePAY instalment calculator for checkout.

    \b
    Example:
      ratepay-oms installment calc 230.00 --months 12
    """


@installment.command("calc")
@click.argument("amount", callback=_amount)
@click.option("--months", type=click.IntRange(min=1), default=None, help="Runtime in months.")
@click.option("--rate", callback=_amount, default=None, help="Monthly rate instead of months.")
@click.option(
    "--first-day",
    "payment_firstday",
    type=click.IntRange(1, 31),
    default=DEFAULT_PAYMENT_FIRSTDAY,
    show_default=True,
    help="Day of the month of the debits.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@engine_options
@translate_db_errors
def calc(
    amount: Decimal,
    months: int | None,
    rate: Decimal | None,
    payment_firstday: int,
    as_json: bool,
    db_url: str | None,
    process_dir: Path | None,
) -> None:
    """Calculate the plan for AMOUNT (the basket amount) by --months or by --rate.

    \b
    Example:
      ratepay-oms installment calc 279.00 --rate 25.00 --json
    """
    if (months is None) == (rate is None):
        raise click.UsageError("give either --months or --rate")
    engine = engine_from_options(db_url, process_dir)
    try:
        quote = engine.calculate_installment(
            amount, months=months, rate=rate, payment_firstday=payment_firstday
        )
    finally:
        engine.close()
    if as_json:
        print_json(quote.to_dict())
        return
    plan = quote.plan
    table = Table(title=f"instalment plan for {amount}", title_justify="left")
    table.add_column("")
    table.add_column("", justify="right")
    for label, value in (
        ("amount", plan.amount),
        ("interest", plan.interest_amount),
        ("service charge", plan.service_charge),
        ("total", plan.total_amount),
        ("rates", plan.number_of_rates),
        ("monthly rate", plan.rate),
        ("last rate", plan.last_rate),
        ("interest rate %", plan.interest_rate),
        ("annual percentage rate %", plan.annual_percentage_rate),
        ("debit day", plan.payment_firstday),
    ):
        table.add_row(label, str(value))
    console = stdout_console()
    console.print(table)
    if quote.notice:
        console.print(f"adjusted by RatePAY ({quote.reason_code}): {quote.notice}", markup=False)
