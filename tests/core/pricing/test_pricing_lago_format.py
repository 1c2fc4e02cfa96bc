"""Lago charge objects, checked against the worked examples of Lago's charge-model pages."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from meterline.core.pricing.base import charge, charge_events
from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.lago_format import price_from_lago
from meterline.core.pricing.percentage import PercentagePrice
from meterline.core.pricing.tiers import GraduatedPrice, Tier
from meterline.core.pricing.unit import PerUnitPrice
from meterline.core.pricing.wrappers import Allowance, Commitment

D = Decimal


def lago_charge(model: str, properties: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A charge shaped like Lago's API returns it inside a plan."""
    charge_obj: dict[str, Any] = {
        "lago_id": "1a901a90-1a90-1a90-1a90-1a901a901a90",
        "lago_billable_metric_id": "1a901a90-1a90-1a90-1a90-1a901a901a91",
        "billable_metric_code": "api_calls",
        "invoice_display_name": "API calls",
        "created_at": "2024-01-01T00:00:00Z",
        "charge_model": model,
        "pay_in_advance": False,
        "invoiceable": True,
        "regroup_paid_fees": None,
        "prorated": False,
        "min_amount_cents": 0,
        "properties": properties,
        "filters": [],
        "taxes": [],
    }
    charge_obj.update(fields)
    return charge_obj


def test_standard_example() -> None:
    # Lago "Standard": $0.05 per API call, 1,000 calls = $50.
    price = price_from_lago(lago_charge("standard", {"amount": "0.05"}), currency="USD")
    assert price == PerUnitPrice("USD", D("0.05"))
    assert charge(price, 1000) == D("50.00")


def test_package_example() -> None:
    # Lago "Package": $5 per 100 units, first 100 free; 201 units cost $10.
    price = price_from_lago(
        lago_charge("package", {"amount": "5", "package_size": 100, "free_units": 100}),
        currency="USD",
    )
    assert isinstance(price, Allowance)
    assert charge(price, 201) == D("10.00")


def test_graduated_ranges() -> None:
    # Lago "Graduated": $1 per unit for the first 100, $0.50 for the next 100, $0.10 after.
    price = price_from_lago(
        lago_charge(
            "graduated",
            {
                "graduated_ranges": [
                    {"from_value": 0, "to_value": 100, "per_unit_amount": "1", "flat_amount": "0"},
                    {
                        "from_value": 101,
                        "to_value": 200,
                        "per_unit_amount": "0.5",
                        "flat_amount": "0",
                    },
                    {
                        "from_value": 201,
                        "to_value": None,
                        "per_unit_amount": "0.1",
                        "flat_amount": "0",
                    },
                ]
            },
        ),
        currency="USD",
    )
    assert price == GraduatedPrice(
        "USD", (Tier(D(100), D(1)), Tier(D(200), D("0.5")), Tier(None, D("0.1")))
    )
    assert charge(price, 250) == D("155.00")
    # Lago counts units in a range as to_value - from_value + 1: 100.5 units put 0.5 in range 2.
    assert price.rate("100.5").amount == D("100.25")


def test_adjacent_ranges_are_accepted() -> None:
    ranges = [
        {"from_value": 0, "to_value": 100, "per_unit_amount": "1", "flat_amount": "0"},
        {"from_value": 100, "to_value": None, "per_unit_amount": "0.5", "flat_amount": "0"},
    ]
    price = price_from_lago(lago_charge("graduated", {"graduated_ranges": ranges}), currency="EUR")
    assert charge(price, 150) == D("125.00")


def test_volume_example() -> None:
    # Lago "Volume": 65,000 API calls at tier 3 = 65,000 x $0.0006 + $10 = $49.
    ranges = [
        {"from_value": 0, "to_value": 10000, "per_unit_amount": "0.0010", "flat_amount": "10"},
        {"from_value": 10001, "to_value": 50000, "per_unit_amount": "0.0008", "flat_amount": "10"},
        {"from_value": 50001, "to_value": 100000, "per_unit_amount": "0.0006", "flat_amount": "10"},
        {"from_value": 100001, "to_value": None, "per_unit_amount": "0.0004", "flat_amount": "10"},
    ]
    price = price_from_lago(lago_charge("volume", {"volume_ranges": ranges}), currency="USD")
    assert charge(price, 65_000) == D("49.00")


def test_percentage_example() -> None:
    # Lago "Percentage": 1.2 % + $0.10 per transaction, first 3 events or $500 free; events
    # $200, $100, $100 are free and the 4th ($50) costs $0.10 + 1.2 % of $50 = $0.70.
    price = price_from_lago(
        lago_charge(
            "percentage",
            {
                "rate": "1.2",
                "fixed_amount": "0.10",
                "free_units_per_events": 3,
                "free_units_per_total_aggregation": "500",
                "per_transaction_min_amount": None,
                "per_transaction_max_amount": None,
            },
        ),
        currency="USD",
    )
    assert price == PercentagePrice("USD", D("1.2"), D("0.10"), 3, D(500))
    assert charge_events(price, [200, 100, 100, 50]) == D("0.70")


def test_percentage_with_per_transaction_limits_and_string_counts() -> None:
    price = price_from_lago(
        lago_charge(
            "percentage",
            {
                "rate": "1",
                "free_units_per_events": "0",
                "per_transaction_min_amount": "0.5",
                "per_transaction_max_amount": "5",
            },
        ),
        currency="USD",
    )
    assert charge_events(price, [10, 100, 1000]) == D("6.50")  # 0.5 + 1 + 5


def test_graduated_percentage_example() -> None:
    # Lago "Graduated percentage": 1 % + $200 up to 1,000; 2 % + $300 up to 10,000; 3 % + $400
    # above. Transactions of $500, $550, $4,000 cost $205, $306, $80: $591 for the period.
    ranges = [
        {"from_value": 0, "to_value": 1000, "rate": "1", "flat_amount": "200"},
        {"from_value": 1001, "to_value": 10000, "rate": "2", "flat_amount": "300"},
        {"from_value": 10001, "to_value": None, "rate": "3", "flat_amount": "400"},
    ]
    price = price_from_lago(
        lago_charge("graduated_percentage", {"graduated_percentage_ranges": ranges}),
        currency="USD",
    )
    assert charge(price, 500) == D("205.00")
    assert charge(price, 5050) == D("591.00")


def test_min_amount_cents_becomes_a_true_up() -> None:
    price = price_from_lago(
        lago_charge("standard", {"amount": "0.05"}, min_amount_cents=1500), currency="USD"
    )
    assert isinstance(price, Commitment)
    assert charge(price, 100) == D("15.00")
    assert price.rate(100).lines() == (D("5.00"), D("10.00"))


def test_currency_from_the_dict_and_grouping_keys_are_ignored() -> None:
    price = price_from_lago(
        lago_charge("standard", {"amount": "3", "grouped_by": ["region"]}, amount_currency="JPY")
    )
    assert charge(price, 2) == D("6")


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(PriceError) as info:
        price_from_lago(
            lago_charge(
                "graduated",
                {
                    "graduated_ranges": [
                        {"from_value": 1, "to_value": 10, "per_unit_amount": 0.5},
                        {
                            "from_value": 5,
                            "to_value": 3,
                            "per_unit_amount": "-1",
                            "flat_amount": "0",
                        },
                    ],
                    "amount": "1",
                },
                filters=[{"values": {"region": ["eu"]}, "properties": {}}],
            )
        )
    errors = info.value.errors
    assert errors[0].startswith("currency: missing")
    assert (
        "filters: per-filter properties are not supported; price each filter separately" in errors
    )
    assert "properties: unknown key(s) amount" in errors
    assert (
        "properties.graduated_ranges[0].from_value: the first range must start at 0, got 1"
        in errors
    )
    assert any(
        e.startswith("properties.graduated_ranges[0].per_unit_amount: float 0.5") for e in errors
    )
    ranges = "properties.graduated_ranges"
    assert (
        f"{ranges}[1].from_value: must be the previous to_value (10) or that + 1, got 5" in errors
    )
    assert "properties.graduated_ranges[1].to_value: must be above from_value 5, got 3" in errors
    assert "properties.graduated_ranges[1].per_unit_amount: must not be negative, got -1" in errors
    assert any(
        e.startswith("properties.graduated_ranges[1].to_value: the last tier must be unbounded")
        for e in errors
    )
    assert f"{ranges}[1].to_value: tiers must be in ascending order, 3 is not above 10" in errors
    assert len(errors) == 10


@pytest.mark.parametrize(
    ("model", "properties", "fields", "message"),
    [
        ("dynamic", {}, {}, "charge_model"),
        ("standard", {}, {}, r"properties.amount: missing"),
        ("standard", {"amount": "1"}, {"properties": None}, "properties: must be an object"),
        ("package", {"amount": "1", "package_size": 0}, {}, "package_size: must be greater than 0"),
        ("package", {"amount": "1", "package_size": 1.5}, {}, "whole number"),
        ("percentage", {}, {}, "rate: missing"),
        ("percentage", {"rate": "120"}, {}, "at most 100"),
        (
            "percentage",
            {"rate": "1", "per_transaction_min_amount": "5", "per_transaction_max_amount": "1"},
            {},
            "above",
        ),
        ("volume", {"volume_ranges": []}, {}, "non-empty list"),
        ("volume", {"volume_ranges": [5]}, {}, "must be an object"),
        (
            "volume",
            {"volume_ranges": [{"from_value": 0, "to_value": None}]},
            {},
            "per_unit_amount: missing",
        ),
        (
            "graduated_percentage",
            {"graduated_percentage_ranges": [{"from_value": 0, "to_value": None, "rate": "101"}]},
            {},
            "at most 100",
        ),
        ("standard", {"amount": "1"}, {"min_amount_cents": -5}, "min_amount_cents"),
        ("standard", {"amount": "1"}, {"amount_currency": "ZZZ"}, "unknown currency"),
    ],
)
def test_rules(
    model: str, properties: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    doc = lago_charge(model, properties)
    doc.update(fields)
    kwargs = {} if "amount_currency" in fields else {"currency": "USD"}
    with pytest.raises(PriceError, match=message):
        price_from_lago(doc, **kwargs)


def test_not_a_mapping() -> None:
    with pytest.raises(PriceError, match="charge object"):
        price_from_lago(["standard"], currency="USD")  # type: ignore[arg-type]
