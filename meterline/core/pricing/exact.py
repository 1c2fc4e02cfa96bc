"""Exact decimal arithmetic for money and quantities: no float, no silent rounding.

Every computation in the pricing core runs inside ``exact()``: a decimal context whose
precision is far beyond anything a validated price can produce and which *traps*
``Inexact`` and ``Rounded``. Multiplication, addition and the divisions we do (by 100, by a
package size with ``//`` and ``%``) are exact on bounded inputs, so a trap firing is a bug,
never a business outcome. The one place money is rounded on purpose is
``Currency.round`` (see rounding.py), with its own context.
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from contextlib import AbstractContextManager
from decimal import Decimal, InvalidOperation

from meterline.core.pricing.errors import RatingError
from meterline.core.quantity import QuantityError, to_nanos

# Validated inputs have at most MAX_INTEGER_DIGITS + MAX_FRACTION_DIGITS digits (amounts)
# or 29 + 9 (quantities, see quantity.py); a product of two is under 100 digits and a sum
# of a few million of them adds ~7. 200 leaves room without ever being reached.
_PRECISION = 200
# Amounts: up to 10**15 major units (a quadrillion dollars per unit is not a price), and
# 18 fractional digits: Stripe's unit_amount_decimal allows 12 decimals of a *minor* unit,
# i.e. 15 of the major unit for three-decimal currencies like BHD.
MAX_INTEGER_DIGITS = 15
MAX_FRACTION_DIGITS = 18

_EXACT = decimal.Context(
    prec=_PRECISION,
    rounding=decimal.ROUND_HALF_EVEN,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[
        decimal.InvalidOperation,
        decimal.DivisionByZero,
        decimal.Overflow,
        decimal.Inexact,
        decimal.Rounded,
    ],
)

ZERO = Decimal(0)
HUNDRED = Decimal(100)

AmountLike = Decimal | int | str


def exact() -> AbstractContextManager[decimal.Context]:
    """Context manager: decimal arithmetic that raises instead of rounding."""
    return decimal.localcontext(_EXACT)


def fraction_digits(value: Decimal) -> int:
    """Significant fractional digits, ignoring trailing zeros ("1.500" -> 1). Works on the
    digit tuple so that no decimal context (and its precision) is involved."""
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    trailing = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    if trailing == len(digits):
        return 0
    return max(0, -(exponent + trailing))


def fmt(value: Decimal) -> str:
    """Plain decimal text without exponent or trailing zeros: 6.50 -> '6.5', 1E+2 -> '100'."""
    if value == 0:
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def describe_type(value: object) -> str:
    return type(value).__name__


def parse_decimal(value: object, where: str, errors: list[str]) -> Decimal | None:
    """An exact Decimal from int, Decimal or decimal str; anything else is reported.

    Floats are refused outright: ``0.1`` is already 0.1000000000000000055511151231257827 by
    the time we see it, and a price sheet must say exactly what it means.
    """
    if isinstance(value, bool):
        errors.append(f"{where}: must be a number, not bool")
        return None
    if isinstance(value, float):
        errors.append(
            f"{where}: float {value!r} is not accepted (binary floats are inexact); "
            f'write it as a string, e.g. "{value!r}", or a Decimal'
        )
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        dec = value
    elif isinstance(value, str):
        try:
            dec = Decimal(value.strip())
        except InvalidOperation:
            errors.append(f"{where}: {value!r} is not a decimal number")
            return None
    else:
        errors.append(
            f"{where}: must be a decimal string, int or Decimal, got {describe_type(value)}"
        )
        return None
    if not dec.is_finite():
        errors.append(f"{where}: must be finite, got {dec}")
        return None
    return dec


def parse_amount(value: object, where: str, errors: list[str]) -> Decimal | None:
    """A money amount (major units) or rate: exact, non-negative, bounded digits."""
    dec = parse_decimal(value, where, errors)
    if dec is None:
        return None
    if dec < 0:
        errors.append(f"{where}: must not be negative, got {fmt(dec)}")
        return None
    if dec == 0:
        dec = ZERO  # also turns -0 into 0
    if dec != 0 and dec.adjusted() >= MAX_INTEGER_DIGITS:
        errors.append(f"{where}: {fmt(dec)} is too large (at most {MAX_INTEGER_DIGITS} digits)")
        return None
    if fraction_digits(dec) > MAX_FRACTION_DIGITS:
        errors.append(f"{where}: {dec} has more than {MAX_FRACTION_DIGITS} fractional digits")
        return None
    return dec


def parse_bound(value: object, where: str, errors: list[str]) -> Decimal | None:
    """A quantity bound (tier up_to, package size, free units): exact, >= 0, and
    representable as a quantity (9 fractional digits, quantity.py's range)."""
    dec = parse_decimal(value, where, errors)
    if dec is None:
        return None
    if dec < 0:
        errors.append(f"{where}: must not be negative, got {fmt(dec)}")
        return None
    try:
        to_nanos(dec)
    except QuantityError as exc:
        errors.append(f"{where}: {exc}")
        return None
    return ZERO if dec == 0 else dec


def parse_count(value: object, where: str, errors: list[str]) -> int | None:
    """A whole, non-negative count (events, package size in Lago/Stripe). Accepts an int or
    a string of digits (Lago sends some counts as strings)."""
    if isinstance(value, bool | float):
        errors.append(f"{where}: must be a whole number, got {describe_type(value)} {value!r}")
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        errors.append(f"{where}: must be a whole number, got {value!r}")
        return None
    if value < 0:
        errors.append(f"{where}: must not be negative, got {value}")
        return None
    return value


def to_quantity(value: object, where: str = "quantity") -> Decimal:
    """Validate one quantity handed to a price: an int, Decimal or decimal str of at most 9
    fractional digits (the pipeline's nano-unit precision), never a float, never negative.

    Rollups carry nano-unit ints; convert them with ``meterline.core.quantity.to_decimal``
    first, because a bare int here means whole units.
    """
    if isinstance(value, float):
        raise RatingError(
            f"{where}: float {value!r} is not accepted on the pricing path; "
            "pass an int, Decimal or decimal str"
        )
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise RatingError(
            f"{where}: must be int, Decimal or decimal str, got {describe_type(value)}"
        )
    try:
        to_nanos(value)
    except QuantityError as exc:
        raise RatingError(f"{where}: {exc}") from None
    dec = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    if dec < 0:
        raise RatingError(f"{where}: must not be negative, got {fmt(dec)}")
    return ZERO if dec == 0 else dec


def reject_unknown_keys(
    doc: Mapping[str, object], known: set[str], where: str, errors: list[str]
) -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        prefix = f"{where}: " if where else ""
        errors.append(f"{prefix}unknown key(s) {', '.join(map(str, unknown))}")
