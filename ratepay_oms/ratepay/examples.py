"""The reference's worked example (order 100045, ``ratepay-xml-api.md`` §8) as typed inputs.

Used by the tests, the demo and anyone trying the facade against the sandbox: a B2C customer
"Erika Beispiel" and the basket 3 × mug, 1 × tea pot with item discount, shipping and voucher.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from ratepay_oms.ratepay.types import (
    Address,
    BankAccount,
    Basket,
    BasketItem,
    BasketPosition,
    Customer,
)

ORDER_ID = "100045"
TAX = Decimal("19")

MUG = BasketItem("SKU-100", "Coffee mug", 3, Decimal("12.50"), TAX)
TEA_POT = BasketItem("SKU-200", "Tea pot", 1, Decimal("49.90"), TAX, discount=Decimal("-4.90"))
SHIPPING = BasketPosition(Decimal("4.95"), TAX, "Standard shipping")
VOUCHER = BasketPosition(Decimal("-5.00"), TAX, "Voucher WELCOME5")


def example_customer(last_name: str = "Beispiel", *, with_bank_account: bool = False) -> Customer:
    """Erika from §8.2; ``last_name="Ablehnung"`` is the sandbox's decline trigger."""
    return Customer(
        first_name="Erika",
        last_name=last_name,
        gender="F",
        date_of_birth=date(1985, 4, 12),
        ip_address="203.0.113.17",
        email="erika.beispiel@example.org",
        phone="030 1234567",
        billing_address=Address(
            street="Musterweg",
            street_number="7a",
            zip_code="10115",
            city="Berlin",
            country_code="DE",
        ),
        nationality="DE",
        bank_account=(
            BankAccount(owner="Erika Beispiel", iban="DE02120300000000202051")
            if with_bank_account
            else None
        ),
    )


def example_basket() -> Basket:
    """The full order basket of §8.2 (amount 82.45)."""
    return Basket(items=(MUG, TEA_POT), shipping=SHIPPING, discount=VOUCHER)


def lines(*items: tuple[BasketItem, int]) -> tuple[BasketItem, ...]:
    """The given items with the quantities of one follow-up (delta basket)."""
    return tuple(
        BasketItem(
            item.article_number,
            item.name,
            quantity,
            item.unit_price_gross,
            item.tax_rate,
            discount=item.discount,
            unique_article_number=item.unique_article_number,
        )
        for item, quantity in items
    )
