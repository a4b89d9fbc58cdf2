"""The order file format: typed, Decimal money, one clear message per broken field."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratepay_oms.orders import OrderInputError, load_order_file, parse_order


@pytest.fixture
def example() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "data" / "order-invoice.json").read_text())


def test_example_file_parses_with_decimal_money() -> None:
    order = load_order_file(Path(__file__).parent / "data" / "order-invoice.json")
    assert order.order_ref == "100045"
    assert order.items[0].name == 'Mug "Kaffee & Kuchen"'
    assert order.items[0].unit_price_gross == Decimal("12.50")
    assert order.items[1].discount == Decimal("-4.90")
    # 3 × 12.50 + (49.90 − 4.90) = 82.50; + 4.95 shipping − 5.00 voucher = 82.45
    assert order.goods_total == Decimal("82.50")
    assert order.basket_amount == Decimal("82.45")


def test_round_trip_through_to_dict(example: dict[str, Any]) -> None:
    order = parse_order(example)
    assert parse_order(json.loads(json.dumps(order.to_dict()))) == order


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.pop("order_ref"), "order_ref: missing"),
        (lambda o: o["items"].clear(), "items: an order needs at least one item"),
        (lambda o: o["items"][1].update(quantity=0), "items[1].quantity: must be at least 1"),
        (lambda o: o["items"][0].update(unit_price_gross="abc"), "items[0].unit_price_gross: not"),
        (lambda o: o["items"][0].update(unit_price_gross="1.005"), "more than 2 decimal places"),
        (lambda o: o["items"][1].update(discount="4.90"), "items[1].discount: a discount is zero"),
        (lambda o: o["payment"].update(method="CASH"), "payment.method: 'CASH' is not one of"),
        (lambda o: o["payment"].update(method="ELV"), "customer.bank_account: missing"),
        (lambda o: o["customer"].pop("last_name"), "customer.last_name: missing"),
        (lambda o: o["customer"]["billing_address"].pop("city"), "billing_address.city: missing"),
        (lambda o: o.update(colour="red"), "colour: unknown field"),
        (lambda o: o["items"][0].update(unit_price_gross=12.5), "not as a float"),
    ],
)
def test_broken_field_is_named(example: dict[str, Any], mutate: Any, message: str) -> None:
    mutate(example)
    with pytest.raises(OrderInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_order(example)


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "order_ref": "1",\n  oops\n}')
    with pytest.raises(OrderInputError, match=r"bad.json:3:3: invalid JSON"):
        load_order_file(bad)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5)
    | st.decimals(allow_nan=False, places=3),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(path=st.lists(st.sampled_from(["customer", "items", 0, 1, "payment", "billing_address",
                                      "quantity", "unit_price_gross", "method", "shipping"]),
                     min_size=1, max_size=3),
       value=_json)
def test_any_mangled_order_is_accepted_or_refused_cleanly(path: list[Any], value: Any) -> None:
    data = json.loads((Path(__file__).parent / "data" / "order-invoice.json").read_text())
    target: Any = data
    for key in path[:-1]:
        try:
            target = target[key]
        except (KeyError, IndexError, TypeError):
            return
    try:
        target[path[-1]] = copy.deepcopy(value)
    except (IndexError, TypeError):
        return
    try:
        order = parse_order(data)
    except OrderInputError as exc:
        assert str(exc)
    else:
        assert order.basket_amount >= 0
