"""Exact quantities as scaled integers.

A quantity is an ``int`` counting nano-units: 1 unit == ``SCALE`` == 10**9. Integer
addition is exact, so summing 0.1 ten million times gives exactly 1,000,000 units; nothing
on the billing path is ever a binary float.

Precision and range:
- 9 fractional digits. Inputs with more digits are rejected (never rounded): rounding
  would silently change what a customer is billed.
- One event's quantity must fit a signed 64-bit int of nano-units on the wire:
  |q| <= 9,223,372,036.854775807 units. Larger single quantities are carried as decimal
  strings in the envelope (see docs/envelope.md), so the range is unbounded in Python.
- Totals are Python ints (unbounded) and ClickHouse Decimal(38, 9) (29 integer digits).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

SCALE_DIGITS = 9
SCALE = 10**SCALE_DIGITS
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# Beyond 2**53 a float no longer has integer precision, so round-trip checks below stop
# being meaningful; such values must come in as int, Decimal or str.
_FLOAT_EXACT_LIMIT = float(2**53)


class QuantityError(ValueError):
    """The value cannot be represented exactly as a quantity."""


def to_nanos(value: object) -> int:
    """Convert an int, Decimal, decimal string or float into exact nano-units.

    Floats are accepted when the decimal they were written as has at most 9 fractional
    digits (``0.1`` -> 100_000_000): we take the 9-digit decimal nearest to the float and
    require that it converts back to the very same float. ``1/3`` is rejected.
    """
    if type(value) is int:
        return value * SCALE
    if isinstance(value, bool):
        raise QuantityError("must be a number, not bool")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise QuantityError(f"must be finite, got {value!r}")
        scaled = value * SCALE
        if abs(scaled) >= _FLOAT_EXACT_LIMIT:
            raise QuantityError(
                f"{value!r} is too large to be exact as a float; pass an int, Decimal or str"
            )
        nanos = round(scaled)
        if nanos / SCALE != value:
            raise QuantityError(
                f"{value!r} has more than {SCALE_DIGITS} fractional digits; "
                "pass a Decimal or str to state the exact amount"
            )
        return nanos
    if isinstance(value, int):  # int subclasses (e.g. numpy ints via __index__ are not here)
        return int(value) * SCALE
    if isinstance(value, Decimal):
        return _decimal_to_nanos(value)
    if isinstance(value, str):
        try:
            dec = Decimal(value.strip())
        except InvalidOperation:
            raise QuantityError(f"{value!r} is not a decimal number") from None
        return _decimal_to_nanos(dec)
    raise QuantityError(f"must be int, float, Decimal or decimal str, got {type(value).__name__}")


def _decimal_to_nanos(dec: Decimal) -> int:
    if not dec.is_finite():
        raise QuantityError(f"must be finite, got {dec}")
    scaled = dec.scaleb(SCALE_DIGITS)
    if scaled != scaled.to_integral_value():
        raise QuantityError(f"{dec} has more than {SCALE_DIGITS} fractional digits")
    return int(scaled)


def to_decimal(nanos: int) -> Decimal:
    """Exact Decimal for a nano-unit count (for display and APIs)."""
    return Decimal(nanos).scaleb(-SCALE_DIGITS)


def format_nanos(nanos: int) -> str:
    """Plain decimal string without exponent and without trailing zeros: 100_000_000 -> '0.1'."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), SCALE)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")
