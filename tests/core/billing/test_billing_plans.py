"""Plan documents: validated at once, exact, currency inherited by every charge."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterline.core.billing import BillingError, build_plan_version, parse_plan_text
from meterline.core.billing.plans import LimitKind, PeriodAggregation

PLAN = """
id = "pro"
name = "Pro"
currency = "EUR"
base_fee = "49.00"

[[charges]]
meter = "api_calls"
aggregation = "count"
price = { model = "graduated", tiers = [ { up_to = 1000, unit_amount = 0 },
                                         { unit_amount = 0.002 } ] }

[[charges]]
meter = "storage_gb"
aggregation = "time_weighted_sum"
time_unit = "hour"
price = { model = "per_unit", unit_amount = "0.0001" }

[[charges]]
meter = "active_users"
aggregation = "unique_count"
dimension = "user_id"
price = { model = "per_unit", unit_amount = "1.5" }

[[limits]]
meter = "api_calls"
kind = "hard"
value = 1000000

[entitlements]
sso = true
seats = 10
"""


def test_plan_document_loads_exactly() -> None:
    plan = build_plan_version(parse_plan_text(PLAN))
    assert plan.plan_id == "pro" and plan.currency.code == "EUR"
    assert plan.base_fee == Decimal("49.00")
    assert [c.aggregation for c in plan.charges] == [
        PeriodAggregation.COUNT, PeriodAggregation.TIME_WEIGHTED_SUM,
        PeriodAggregation.UNIQUE_COUNT]
    # TOML 0.002 is read as an exact decimal: 1500 calls -> 500 paid x 0.002 = 1.00 EUR.
    assert plan.charges[0].price.rate(1500).rounded == Decimal("1.00")
    assert plan.charges[0].price.currency.code == "EUR"
    assert plan.limits[0].kind is LimitKind.HARD and plan.limits[0].value == 1_000_000
    assert plan.entitlements == {"sso": True, "seats": 10}
    # The canonical document (what the event log stores) reloads to the same plan.
    again = build_plan_version(plan.document)
    assert again.charges[0].price == plan.charges[0].price


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(BillingError) as info:
        build_plan_version({
            "id": "Bad Id", "currency": "UDS", "base_fee": "-1", "colour": "red",
            "charges": [
                {"meter": "api_calls", "aggregation": "median",
                 "price": {"model": "per_unit", "unit_amount": 0.1}},
                {"meter": "storage_gb", "aggregation": "time_weighted_sum",
                 "price": {"model": "per_unit", "unit_amount": "1", "currency": "USD"}},
                {"meter": "x", "aggregation": "unique_count",
                 "price": {"model": "graduated",
                           "tiers": [{"up_to": 10, "unit_amount": "1"},
                                     {"up_to": 5, "unit_amount": "1"}]}},
            ],
            "limits": [{"meter": "api_calls", "kind": "sometimes", "value": -3}],
        })
    errors = info.value.errors
    for fragment in [
        "unknown key(s) colour",
        "id: must match",
        "currency: unknown currency 'UDS'",
        "base_fee: must not be negative",
        "charges[0].aggregation: 'median' is not one of",
        "charges[1].time_unit: time_weighted_sum needs one of",
        "charges[1].price.currency: a charge is priced in the plan's currency",
        "charges[2].dimension: unique_count needs the dimension",
        "limits[0].kind: must be hard or soft",
        "limits[0].value: must not be negative",
    ]:
        assert any(fragment in e for e in errors), (fragment, errors)


def test_price_errors_are_reported_per_charge_when_currency_is_known() -> None:
    with pytest.raises(BillingError) as info:
        build_plan_version({
            "id": "p", "currency": "USD",
            "charges": [{"meter": "api_calls", "aggregation": "sum",
                         "price": {"model": "graduated",
                                   "tiers": [{"up_to": 10, "unit_amount": 0.5},
                                             {"up_to": 5, "unit_amount": "-1"}]}}],
        })
    errors = info.value.errors
    assert any(e.startswith("charges[0].price.tiers[0].unit_amount: float 0.5") for e in errors)
    assert any("tiers must be in ascending order" in e for e in errors)
    assert any("the last tier must be unbounded" in e for e in errors)
    assert any("must not be negative, got -1" in e for e in errors)


def test_base_fee_must_be_whole_minor_units_and_charges_unique() -> None:
    with pytest.raises(BillingError) as info:
        build_plan_version({
            "id": "p", "currency": "JPY", "base_fee": "100.5",
            "charges": [{"meter": "a", "aggregation": "sum",
                         "price": {"model": "per_unit", "unit_amount": "1"}}] * 2,
        })
    assert any("not a whole number of JPY minor units" in e for e in info.value.errors)
    assert any("a:sum is charged twice" in e for e in info.value.errors)


def test_second_version_needs_effective_date() -> None:
    with pytest.raises(BillingError, match="needs an effective_from"):
        build_plan_version({"id": "p", "currency": "USD"}, version=2)


def test_charges_are_checked_against_the_meter_registry() -> None:
    from meterline.config import DEFAULT_METERS
    from meterline.core.billing.plans import meter_errors
    from meterline.core.meters import MeterRegistry

    registry = MeterRegistry.load(DEFAULT_METERS)
    plan = build_plan_version({"id": "p", "currency": "USD", "charges": [
        {"meter": "llm_tokens", "aggregation": "max",
         "price": {"model": "per_unit", "unit_amount": "1"}},
        {"meter": "active_users", "aggregation": "unique_count", "dimension": "email",
         "price": {"model": "per_unit", "unit_amount": "1"}},
        {"meter": "nope", "aggregation": "sum", "price": {"model": "per_unit",
                                                          "unit_amount": "1"}},
        {"meter": "storage_gb", "aggregation": "time_weighted_sum", "time_unit": "hour",
         "price": {"model": "per_unit", "unit_amount": "1"}},
    ]})
    assert meter_errors(plan, registry) == [
        "charges[0] (llm_tokens:max): a sum meter cannot be billed by max (needs a meter "
        "aggregated by max)",
        "charges[1] (active_users:unique_count): meter active_users has no dimension 'email'",
        "charges[2] (nope:sum): meter 'nope' is not defined",
    ]
