"""Exact quantities as scaled integers.

A quantity is an ``int`` counting nano-units: 1 unit == ``SCALE`` == 10**9. Integer
addition is exact, so summing 0.1 ten million times gives exactly 1,000,000 units; nothing
on the billing path is ever a binary float.

Precision and range:
- 9 fractional digits. Inputs with more digits are rejected (never rounded): rounding
  would silently change what a customer is billed.
- On the wire a quantity is a signed 64-bit int of nano-units when it fits
  (|q| <= 9,223,372,036.854775807 units); larger single quantities are carried as decimal
  strings in the envelope (see docs/envelope.md).
- One quantity must fit ClickHouse Decimal(38, 9): |q| <= MAX_NANOS (10**38 - 1 nano-units,
  just under 10**29 units). Anything larger could not be stored, and would make the
  consumer reject the whole batch it travels in, so ``to_nanos`` refuses it.
- Floats are accepted only below 2**23 (8,388,608) units: above that, two 9-digit decimals
  can share one float, so the decimal the caller wrote is no longer recoverable.
- Totals are Python ints (unbounded) and ClickHouse Decimal(38, 9) (29 integer digits).
"""

from __future__ import annotations

import decimal
from decimal import Decimal, InvalidOperation

SCALE_DIGITS = 9
SCALE = 10**SCALE_DIGITS
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MAX_NANOS = 10**38 - 1  # ClickHouse Decimal(38, 9)
MAX_UNITS = MAX_NANOS // SCALE  # largest whole-unit int quantity
_MAX_DIGITS = 38
# From 2**23 units up, float spacing (2**-29 ~ 1.9e-9) exceeds 1e-9: two different 9-digit
# decimals can round to the same float, so "the decimal it was written as" is ambiguous
# (8388608.000000001 would be billed as ...002). Such values must come as int/Decimal/str.
_FLOAT_EXACT_LIMIT = float(2**23)


# The fast path of _decimal_to_nanos: 38 digits (a Decimal(38, 9)) and a trap on every
# signal, so a shift that would round, or lose a digit, raises instead of answering.
_NANO_SHIFT = decimal.Context(
    prec=_MAX_DIGITS, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN,
    traps=[decimal.InvalidOperation, decimal.Rounded, decimal.Inexact, decimal.Overflow,
           decimal.Underflow, decimal.Subnormal, decimal.Clamped])


class QuantityError(ValueError):
    """The value cannot be represented exactly as a quantity."""


def to_nanos(value: object) -> int:
    """Convert an int, Decimal, decimal string or float into exact nano-units.

    Floats are accepted when the decimal they were written as has at most 9 fractional
    digits (``0.1`` -> 100_000_000): we take the 9-digit decimal nearest to the float and
    require that it converts back to the very same float. ``1/3`` is rejected.
    """
    if type(value) is int:
        if not -MAX_UNITS <= value <= MAX_UNITS:
            raise QuantityError(f"{value} is out of range (|quantity| < 10**29 units)")
        return value * SCALE
    if isinstance(value, bool):
        raise QuantityError("must be a number, not bool")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise QuantityError(f"must be finite, got {value!r}")
        if abs(value) >= _FLOAT_EXACT_LIMIT:
            raise QuantityError(
                f"{value!r} is too large to be exact as a float; pass an int, Decimal or str"
            )
        nanos = round(value * SCALE)
        if nanos / SCALE != value:
            raise QuantityError(
                f"{value!r} has more than {SCALE_DIGITS} fractional digits; "
                "pass a Decimal or str to state the exact amount"
            )
        return nanos
    if isinstance(value, int):  # int subclasses (e.g. numpy ints via __index__ are not here)
        return to_nanos(int(value))
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
    # Fast path (~5x; rating converts millions of values): shift by 9 digits in a context
    # that traps any rounding, and take the int only when it equals the shifted value.
    # Everything else (too many fractional digits, out of range, zero with a large
    # exponent, not finite) takes the digit path below, which says what is wrong.
    if dec.is_finite() and dec.adjusted() < _MAX_DIGITS - SCALE_DIGITS:
        try:
            scaled = dec.scaleb(SCALE_DIGITS, _NANO_SHIFT)
        except ArithmeticError:
            pass
        else:
            nanos = int(scaled)
            if nanos == scaled:
                return nanos
    return _decimal_digits_to_nanos(dec)


def _decimal_digits_to_nanos(dec: Decimal) -> int:
    # Exact digit arithmetic, no decimal context: Decimal.scaleb rounds to the context's 28
    # significant digits (silently changing 12345678901234567890.123456789) and raises
    # decimal.Overflow for huge exponents.
    if not dec.is_finite():
        raise QuantityError(f"must be finite, got {dec}")
    sign, digits, exponent = dec.as_tuple()
    assert isinstance(exponent, int)
    if not any(digits):
        return 0
    if dec.adjusted() + SCALE_DIGITS >= _MAX_DIGITS:
        raise QuantityError(f"{dec} is out of range (|quantity| < 10**29 units)")
    shift = exponent + SCALE_DIGITS
    if shift >= 0:
        nanos = int("".join(map(str, digits))) * 10**shift
    else:
        cut = -shift
        if cut >= len(digits) or any(digits[-cut:]):
            raise QuantityError(f"{dec} has more than {SCALE_DIGITS} fractional digits")
        nanos = int("".join(map(str, digits[:-cut])))
    return -nanos if sign else nanos


def to_decimal(nanos: int) -> Decimal:
    """Exact Decimal for a nano-unit count (for display and APIs)."""
    # Built from digits, not with scaleb(): scaleb rounds to the context's 28 digits.
    sign, digits, _ = Decimal(nanos).as_tuple()
    return Decimal((sign, digits, -SCALE_DIGITS))


def format_nanos(nanos: int) -> str:
    """Plain decimal string without exponent and without trailing zeros: 100_000_000 -> '0.1'."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), SCALE)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")
