"""Currencies and their minor units (ISO 4217 exponents).

A charge is computed at full precision and rounded once per line item to the currency's
minor unit (see rounding.py). The exponent says how many decimals that minor unit has:
USD cents (2), JPY yen (0), BHD fils (3).

Only currencies listed here are accepted: an unknown code is far more often a typo
("UDS") than a currency we have never heard of, and guessing its minor unit would
misprice every line.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation

from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.exact import fmt

# ISO 4217 minor-unit exponents. Stripe treats a few of these specially in its API
# (e.g. HUF and TWD amounts must be whole units for payouts); we follow ISO for rating.
MINOR_UNITS: dict[str, int] = {
    # 2 decimals
    "USD": 2, "EUR": 2, "GBP": 2, "CHF": 2, "CAD": 2, "AUD": 2, "NZD": 2, "INR": 2,
    "SEK": 2, "NOK": 2, "DKK": 2, "PLN": 2, "CZK": 2, "HUF": 2, "RON": 2, "BGN": 2,
    "SGD": 2, "HKD": 2, "CNY": 2, "TWD": 2, "MXN": 2, "BRL": 2, "ZAR": 2, "ILS": 2,
    "AED": 2, "SAR": 2, "QAR": 2, "TRY": 2, "THB": 2, "MYR": 2, "PHP": 2, "IDR": 2,
    "EGP": 2, "NGN": 2, "KES": 2, "ARS": 2, "COP": 2, "PEN": 2, "UAH": 2, "PKR": 2,
    # 0 decimals
    "JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "UGX": 0, "PYG": 0, "XOF": 0,
    "XAF": 0, "RWF": 0,
    # 3 decimals
    "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3, "LYD": 3, "IQD": 3,
}  # fmt: skip

# Quantize needs a context with room for the whole amount; it never rounds beyond the
# quantum we ask for. ROUND_HALF_UP here is Decimal's "half away from zero".
_ROUNDING = Context(prec=200, rounding=ROUND_HALF_UP, traps=[InvalidOperation])


@dataclass(frozen=True, slots=True)
class Currency:
    code: str
    minor_units: int

    @property
    def quantum(self) -> Decimal:
        """The minor unit as a Decimal exponent: Decimal('0.01') for USD, '1' for JPY."""
        return Decimal((0, (1,), -self.minor_units))

    def round(self, amount: Decimal) -> Decimal:
        """Round a full-precision amount to the minor unit, half away from zero.

        Half-up rather than banker's rounding: it is what invoices and Stripe do on line
        items (Stripe's "Decimal amounts" page rounds 1.5 cents to 2), and customers can
        check it by hand. The bias it has on exact halves is paid once per line, not
        accumulated, because totals are sums of already-rounded lines.
        """
        rounded = amount.quantize(self.quantum, context=_ROUNDING)
        return rounded.copy_abs() if rounded == 0 else rounded

    def is_whole_minor(self, amount: Decimal) -> bool:
        """True when the amount needs no rounding (e.g. a minimum of 10.00 USD)."""
        return amount == amount.quantize(self.quantum, context=_ROUNDING)

    def to_major(self, minor: Decimal) -> Decimal:
        """Minor units (Stripe's cents) to major units, exactly: 5 -> 0.05 for USD."""
        sign, digits, exponent = minor.as_tuple()
        assert isinstance(exponent, int)
        return Decimal((sign, digits, exponent - self.minor_units))

    def format(self, amount: Decimal) -> str:
        return f"{fmt(amount)} {self.code}"

    def __str__(self) -> str:
        return self.code


def currency(code: object) -> Currency:
    """Look a currency up by its ISO code, case-insensitively ('usd' is Stripe's spelling)."""
    errors: list[str] = []
    found = parse_currency(code, "currency", errors)
    if found is None:
        raise PriceError(errors)
    return found


def parse_currency(code: object, where: str, errors: list[str]) -> Currency | None:
    if isinstance(code, Currency):
        return code
    if not isinstance(code, str) or not code.strip():
        errors.append(f"{where}: must be an ISO 4217 code like 'USD', got {code!r}")
        return None
    upper = code.strip().upper()
    if upper not in MINOR_UNITS:
        errors.append(f"{where}: unknown currency {code!r} (not in Meterline's ISO 4217 table)")
        return None
    return Currency(upper, MINOR_UNITS[upper])
