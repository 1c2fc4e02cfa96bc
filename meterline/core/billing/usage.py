"""Period quantities that the rollups cannot give as a plain sum: gauges.

``time_weighted_quantity`` is the exact integral of a gauge over ``[start_ms, end_ms)``
(``meterline.core.aggregations.TimeWeightedSum``: value x milliseconds from the change
points, the value in force before ``start_ms`` carried in), expressed in ``time_unit``
(GB-hours, seat-days, ...). The integral is an exact int of nano-unit-milliseconds; the
conversion to units x time_unit is rounded once, half away from zero, to the nano-unit,
the precision every quantity has in Meterline (plans.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction

from meterline.core.aggregations import GaugePoint, TimeWeightedSum
from meterline.core.billing.plans import TIME_UNITS_MS
from meterline.core.billing.segments import round_nanos
from meterline.core.quantity import SCALE, to_decimal

_TWS = TimeWeightedSum()


def time_weighted_quantity(points: Sequence[GaugePoint], start_ms: int, end_ms: int,
                           time_unit: str, carry_in_nanos: int | None = None) -> Decimal:
    """``points`` are (timestamp_ms, event_id, value_nanos) change points in the period
    (any order); ``carry_in_nanos`` the value in force at ``start_ms`` (None: unknown, so
    the time before the first point counts nothing)."""
    integral = _TWS.integral(sorted(points), start_ms, end_ms, carry_in_nanos)
    return to_decimal(round_nanos(Fraction(integral, SCALE * TIME_UNITS_MS[time_unit])))
