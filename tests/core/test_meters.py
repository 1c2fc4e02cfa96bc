"""Meter registry: TOML loading that reports every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterline.core.errors import ConfigError
from meterline.core.meters import Aggregation, Meter, MeterRegistry

GOOD = """
[meters.api_calls]
aggregation = "count"
unit = "request"
dimensions = ["endpoint", "region"]

[meters.storage_gb]
aggregation = "max"
unit = "GB"
description = "Peak storage"

[meters.credits]
aggregation = "sum"
allow_negative = true

[meters.active_users]
aggregation = "unique_count"
value_property = "user_id"
dimensions = ["user_id", "plan"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meters.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        MeterRegistry.load(write(tmp_path, text))
    assert exc.value.source.endswith("meters.toml")
    return exc.value.errors


def test_load_good(tmp_path: Path) -> None:
    reg = MeterRegistry.load(write(tmp_path, GOOD))
    assert len(reg) == 4
    assert reg.names == ["active_users", "api_calls", "credits", "storage_gb"]
    assert "api_calls" in reg and "nope" not in reg and 3 not in reg
    api = reg.get("api_calls")
    assert api == Meter(
        name="api_calls",
        aggregation=Aggregation.COUNT,
        unit="request",
        dimensions=("endpoint", "region"),
    )
    assert api.group_by == ("endpoint", "region")
    assert reg.get("storage_gb") is not None
    assert reg.get("storage_gb").description == "Peak storage"  # type: ignore[union-attr]
    credits = reg.get("credits")
    assert credits is not None and credits.allow_negative and credits.unit == "unit"
    users = reg.get("active_users")
    assert users is not None
    assert users.aggregation is Aggregation.UNIQUE_COUNT
    assert users.value_property == "user_id"
    assert users.group_by == ("plan",)  # the counted dimension is not a grouping key
    assert {m.name for m in reg} == set(reg.names)
    assert reg.get("nope") is None


def test_three_mistakes_give_three_errors(tmp_path: Path) -> None:
    errors = load_errors(
        tmp_path,
        """
        [meters.api_calls]
        aggregation = "avg"              # 1: unknown aggregation

        [meters.BadName]                 # 2: name not snake_case
        aggregation = "sum"

        [meters.users]
        aggregation = "sum"
        colour = "blue"                  # 3: unknown key
        """,
    )
    assert len(errors) == 3, errors
    assert any(e.startswith("meters.api_calls.aggregation") and "'avg'" in e for e in errors)
    assert any(e.startswith("meters.BadName: name must match") for e in errors)
    assert any(e.startswith("meters.users: unknown key(s) colour") for e in errors)


def test_error_message_lists_all(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        MeterRegistry.load(write(tmp_path, "[meters.a]\naggregation = 1\n[meters.b]\nunit = 2\n"))
    text = str(exc.value)
    assert "has 3 error(s)" in text
    assert exc.value.errors[0] in text and exc.value.errors[-1] in text
    assert isinstance(exc.value, ValueError)


def test_toml_syntax_error(tmp_path: Path) -> None:
    errors = load_errors(tmp_path, "[meters.api_calls\naggregation = 'count'\n")
    assert len(errors) == 1
    assert errors[0].startswith("not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        MeterRegistry.load(tmp_path / "absent.toml")
    assert exc.value.errors[0].startswith("cannot read")


@pytest.mark.parametrize("text", ["", "title = 'x'\n", "[meters]\n", "meters = 3\n"])
def test_needs_meters_table(tmp_path: Path, text: str) -> None:
    assert load_errors(tmp_path, text) == ["needs a non-empty [meters.<name>] table"]


def test_unique_count_needs_value_property_in_dimensions(tmp_path: Path) -> None:
    errors = load_errors(
        tmp_path,
        """
        [meters.users_missing]
        aggregation = "unique_count"
        dimensions = ["plan"]             # value_property defaults to "quantity"

        [meters.users_elsewhere]
        aggregation = "unique_count"
        value_property = "user_id"
        dimensions = ["plan"]
        """,
    )
    assert len(errors) == 2
    assert all(".value_property: unique_count needs value_property" in e for e in errors)
    assert any("'quantity'" in e for e in errors) and any("'user_id'" in e for e in errors)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ('aggregation = "sum"\ndimensions = "region"', ".dimensions: must be a list"),
        ('aggregation = "sum"\ndimensions = ["a", ""]', ".dimensions: must be a list"),
        ('aggregation = "sum"\ndimensions = ["a", 1]', ".dimensions: must be a list"),
        ('aggregation = "sum"\ndimensions = ["a", "a"]', ".dimensions: duplicates"),
        (
            'aggregation = "sum"\ndimensions = [' + ", ".join(f'"d{i}"' for i in range(17)) + "]",
            ".dimensions: more than 16",
        ),
        ('aggregation = "sum"\ndimensions = ["' + "k" * 65 + '"]', ".dimensions: keys longer"),
        ('aggregation = "sum"\nvalue_property = ""', ".value_property: must be a non-empty"),
        ('aggregation = "sum"\nvalue_property = 3', ".value_property: must be a non-empty"),
        ('aggregation = "sum"\nunit = 3', ".unit: must be a str"),
        ('aggregation = "sum"\ndescription = []', ".description: must be a str"),
        ('aggregation = "sum"\nallow_negative = "yes"', ".allow_negative: must be a bool"),
        ("unit = 'x'", ".aggregation: None is not one of"),
        ("aggregation = ['sum']", ".aggregation: ['sum'] is not one of"),
    ],
)
def test_single_mistakes(tmp_path: Path, spec: str, fragment: str) -> None:
    errors = load_errors(tmp_path, f"[meters.m]\n{spec}\n")
    assert len(errors) == 1, errors
    assert errors[0].startswith("meters.m")
    assert fragment in errors[0]


def test_meter_not_a_table(tmp_path: Path) -> None:
    errors = load_errors(tmp_path, "[meters]\napi_calls = 3\n")
    assert errors == ["meters.api_calls: must be a table"]


def test_meter_name_with_trailing_newline_rejected() -> None:
    with pytest.raises(ConfigError) as exc:
        MeterRegistry.from_mapping({"meters": {"api_calls\n": {"aggregation": "sum"}}})
    assert len(exc.value.errors) == 1 and "name must match" in exc.value.errors[0]


def test_from_mapping() -> None:
    reg = MeterRegistry.from_mapping({"meters": {"tokens": {"aggregation": "sum"}}})
    meter = reg.get("tokens")
    assert meter is not None
    assert meter.aggregation is Aggregation.SUM and meter.value_property == "quantity"
    assert meter.group_by == () and not meter.allow_negative
    with pytest.raises(ConfigError) as exc:
        MeterRegistry.from_mapping({"meters": {}}, source="inline")
    assert exc.value.source == "inline"


def test_all_aggregations_load(tmp_path: Path) -> None:
    parts = []
    for agg in Aggregation:
        extra = (
            'value_property = "v"\ndimensions = ["v"]\n' if agg is Aggregation.UNIQUE_COUNT else ""
        )
        parts.append(f'[meters.m_{agg.value}]\naggregation = "{agg.value}"\n{extra}')
    reg = MeterRegistry.load(write(tmp_path, "\n".join(parts)))
    assert {m.aggregation for m in reg} == set(Aggregation)
