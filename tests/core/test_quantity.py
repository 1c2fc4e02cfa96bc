"""Exact quantities: nano-unit ints, no binary floats on the billing path."""

from __future__ import annotations

import itertools
from decimal import Decimal
from fractions import Fraction

import pytest

from meterline.core.quantity import (
    MAX_NANOS,
    MAX_UNITS,
    SCALE,
    QuantityError,
    format_nanos,
    to_decimal,
    to_nanos,
)


def test_scale_is_nine_digits() -> None:
    assert SCALE == 10**9
    assert to_nanos(1) == SCALE


def test_ten_million_tenths_sum_exactly() -> None:
    tenth = to_nanos(0.1)
    assert tenth == 100_000_000
    total = sum(itertools.repeat(tenth, 10_000_000))
    assert total == 1_000_000 * 10**9
    # The float way is off; that is the bug this module exists to avoid.
    assert sum(itertools.repeat(0.1, 1000)) != 100.0


@pytest.mark.parametrize(
    ("value", "nanos"),
    [
        (0, 0),
        (1, 10**9),
        (-3, -3 * 10**9),
        (0.1, 100_000_000),
        (0.3, 300_000_000),
        (-0.0, 0),
        (1.5, 1_500_000_000),
        (0.000000001, 1),
        (0.123456789, 123_456_789),
        (8388607.999999999, 8_388_607_999_999_999),
        (Decimal("0.1"), 100_000_000),
        (Decimal("1.10"), 1_100_000_000),
        (Decimal("-2.000000001"), -2_000_000_001),
        (Decimal("1E+3"), 10**12),
        (Decimal("0E+99999999"), 0),
        ("0.000000001", 1),
        (" 42 ", 42 * 10**9),
        ("1.0000000000", 10**9),  # trailing zeros beyond 9 digits are still exact
        ("-0.5", -500_000_000),
        # More than 28 significant digits: exact, never rounded by a decimal context.
        ("12345678901234567890.123456789", 12345678901234567890123456789),
        ("99999999999999999999999999999.999999999", MAX_NANOS),
        ("-99999999999999999999999999999.999999999", -MAX_NANOS),
        (MAX_UNITS, MAX_UNITS * SCALE),
        (2**70, 2**70 * SCALE),
    ],
)
def test_exact_conversions(value: object, nanos: int) -> None:
    assert to_nanos(value) == nanos
    assert type(to_nanos(value)) is int


@pytest.mark.parametrize(
    "value",
    [
        0.1234567891,  # 10 fractional digits
        1 / 3,
        1e-10,
        5e-324,
        2.0000000005,
    ],
)
def test_floats_with_more_than_nine_fractional_digits_are_rejected(value: float) -> None:
    with pytest.raises(QuantityError, match="fractional digits"):
        to_nanos(value)


@pytest.mark.parametrize("value", ["0.0000000001", Decimal("1.0000000001"), "1e-999999", "-1E-10"])
def test_decimals_with_more_than_nine_fractional_digits_are_rejected(value: object) -> None:
    with pytest.raises(QuantityError, match="fractional digits"):
        to_nanos(value)


@pytest.mark.parametrize(
    "value",
    [
        float("inf"),
        float("-inf"),
        float("nan"),
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        "nan",
        "-Infinity",
    ],
)
def test_non_finite_rejected(value: object) -> None:
    with pytest.raises(QuantityError, match="finite"):
        to_nanos(value)


@pytest.mark.parametrize("value", [True, False])
def test_bool_rejected(value: bool) -> None:
    with pytest.raises(QuantityError, match="bool"):
        to_nanos(value)


@pytest.mark.parametrize("value", [None, [1], b"1", Fraction(1, 2), object()])
def test_other_types_rejected(value: object) -> None:
    with pytest.raises(QuantityError):
        to_nanos(value)


@pytest.mark.parametrize("value", ["", "abc", "1,5", "0x10", "--1", "1.2.3"])
def test_garbage_strings_rejected(value: str) -> None:
    with pytest.raises(QuantityError):
        to_nanos(value)


def test_floats_from_two_pow_23_are_rejected_as_ambiguous() -> None:
    # 8388608.000000001 and 8388608.000000002 are the same float: whichever the caller
    # wrote, converting it could bill the other one. Ints, Decimals and strs are exact.
    assert 8388608.000000001 == 8388608.000000002
    with pytest.raises(QuantityError, match="too large"):
        to_nanos(8388608.000000001)
    with pytest.raises(QuantityError, match="too large"):
        to_nanos(1e16)
    assert to_nanos("8388608.000000001") == 8_388_608_000_000_001
    assert to_nanos(8388608) == 8_388_608 * SCALE


@pytest.mark.parametrize(
    "value",
    [MAX_UNITS + 1, -MAX_UNITS - 1, 10**100, "1e29", "-1e29", Decimal("1E+999999"), "1e999999999"],
)
def test_quantities_beyond_decimal_38_9_rejected(value: object) -> None:
    # A larger single quantity cannot be stored, and the envelope decoder would refuse the
    # whole batch carrying it; never raises decimal.Overflow or hangs on a huge exponent.
    with pytest.raises(QuantityError, match="out of range"):
        to_nanos(value)


def test_int_subclass_is_accepted_as_int() -> None:
    class Units(int):
        pass

    assert to_nanos(Units(7)) == 7 * SCALE


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "0"),
        (1, "0.000000001"),
        (100_000_000, "0.1"),
        (10**9, "1"),
        (-1_500_000_000, "-1.5"),
        (-1, "-0.000000001"),
        (12345678901234567890123456789, "12345678901234567890.123456789"),
        (MAX_NANOS, "99999999999999999999999999999.999999999"),
    ],
)
def test_format_nanos(nanos: int, text: str) -> None:
    assert format_nanos(nanos) == text
    assert to_nanos(format_nanos(nanos)) == nanos
    assert to_decimal(nanos) == Decimal(text)


def test_format_nanos_round_trips() -> None:
    values = [0, 1, -1, 10, 999_999_999, 10**9 + 1, -(10**18), 2**63 - 1, -(2**63), 2**100]
    values += [7**k for k in range(40)] + [-(3**k) for k in range(40)]
    for nanos in values:
        text = format_nanos(nanos)
        assert "e" not in text.lower()
        assert not (("." in text) and text.endswith("0"))
        assert to_nanos(text) == nanos
        assert to_nanos(to_decimal(nanos)) == nanos


def test_decimal_fast_path_agrees_with_the_digit_path() -> None:
    """_decimal_to_nanos's shift-and-compare path returns only when exact; every other
    value falls through to the digit path. Both must agree on value or on the error."""
    import random

    from meterline.core.quantity import _decimal_digits_to_nanos, _decimal_to_nanos

    rng = random.Random(9)
    edge = ["0", "-0", "0E+100", "0E-100", "1E+28", "9.999999999E+28", "1E+29", "1E-9",
            "1E-10", "1.0000000000", "1.00000000000000000000000000000000000000000000",
            "12345678901234567890.123456789", "99999999999999999999999999999.999999999",
            "-99999999999999999999999999999.999999999", "1E+999999", "1E-999999"]
    values = [Decimal(v) for v in edge]
    for _ in range(3000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 45)))
        values.append(Decimal(f"{rng.choice('-+')}{digits}E{rng.randint(-50, 40)}"))

    def outcome(fn: object, value: Decimal) -> object:
        try:
            return fn(value)  # type: ignore[operator]
        except QuantityError as exc:
            return ("error", str(exc))

    for value in values:
        assert outcome(_decimal_to_nanos, value) == outcome(_decimal_digits_to_nanos, value), value
