"""``ratepay-oms credit`` and ``ratepay-oms debit``: a goodwill credit or an adjustment charge on
a delivered order, booked at RatePAY as its own PAYMENT_CHANGE credit, exactly once.

Both go through the engine's firing path like every booking (intent, call, settle), so a lost
answer is never re-sent blindly: RatePAY's status API shows no credit figure, so such an intent
waits for a person (``ratepay-oms intents resolve``). Refused before anything is sent: an order with
nothing delivered, a credit above what the shopper owes, a debit above what RatePAY authorised.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path

import click

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    engine_from_options,
    engine_options,
    print_json,
    translate_db_errors,
)
from ratepay_oms.errors import OmsError


class AdjustmentFailedError(OmsError):
    """RatePAY refused the credit or debit, or its answer is still open."""


def _amount(value: str, what: str) -> Decimal:
    try:
        amount = Decimal(value.strip())
    except (InvalidOperation, AttributeError):
        raise click.BadParameter(f"{what} must be a decimal amount like 5.00") from None
    if not amount.is_finite() or amount <= 0:
        raise click.BadParameter(f"{what} must be positive")
    return amount


def _options(func):  # type: ignore[no-untyped-def]
    func = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(func)
    func = click.option("--reason", default=None, metavar="TEXT",
                        help="Text on RatePAY's correspondence (default: Goodwill credit / "
                             "Adjustment charge).")(func)
    func = click.option("--tax-rate", "tax_rate", default=None, metavar="PERCENT",
                        help="Tax rate of the amount (default: the order's highest).")(func)
    func = click.option("--amount", required=True, metavar="AMOUNT",
                        help="Gross amount, e.g. 5.00.")(func)
    return func


def _run(
    kind: str,
    db_url: str | None,
    process_dir: Path | None,
    ref: str,
    amount: str,
    tax_rate: str | None,
    reason: str | None,
    as_json: bool,
) -> None:
    value = _amount(amount, "--amount")
    rate = _amount(tax_rate, "--tax-rate") if tax_rate is not None else None
    engine = engine_from_options(db_url, process_dir)
    book = engine.credit if kind == "credit" else engine.debit
    result = book(ref, value, tax_rate=rate, reason=reason)
    if as_json:
        print_json(result.to_json())
    else:
        click.echo(result.describe())
    if not result.booked:
        raise AdjustmentFailedError(
            f"{kind} of {value} on order {ref} {result.status}: {result.message or ''}".rstrip(": ")
            + f" (see `ratepay-oms order show {ref}`)"
        )


@cli.command("credit")
@engine_options
@click.argument("ref")
@_options
@translate_db_errors
def credit(
    db_url: str | None,
    process_dir: Path | None,
    ref: str,
    amount: str,
    tax_rate: str | None,
    reason: str | None,
    as_json: bool,
) -> None:
    """Grant a goodwill credit on the delivered order REF (the shopper owes AMOUNT less).

    \b
    Example:
      ratepay-oms credit 100045 --amount 5.00 --reason "late delivery"
    """
    _run("credit", db_url, process_dir, ref, amount, tax_rate, reason, as_json)


@cli.command("debit")
@engine_options
@click.argument("ref")
@_options
@translate_db_errors
def debit(
    db_url: str | None,
    process_dir: Path | None,
    ref: str,
    amount: str,
    tax_rate: str | None,
    reason: str | None,
    as_json: bool,
) -> None:
    """Charge an adjustment on the delivered order REF (the shopper owes AMOUNT more; needs a
    RatePAY contract that allows debits).

    \b
    Example:
      ratepay-oms debit 100045 --amount 2.50 --tax-rate 19 --reason "express surcharge"
    """
    _run("debit", db_url, process_dir, ref, amount, tax_rate, reason, as_json)
