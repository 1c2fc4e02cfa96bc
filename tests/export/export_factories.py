"""Rated lines and items built from plain data, for the export tests (and the seed script)."""

from __future__ import annotations

from decimal import Decimal

from meterline.core.billing.lines import RatedLine
from meterline.core.billing.periods import parse_instant

SECRET = "whsec_testsecret_0123456789abcdef"  # noqa: S105 - a test secret, grepped for


def rated_line(i: int, *, month: str = "2026-11", correction: int = 0,
               amount: str | None = None, currency: str = "USD",
               status: str = "final") -> RatedLine:
    start = parse_instant(f"{month}-01")
    end = start + 30 * 86_400_000
    line_id = f"{start}/usage/api_calls:count"
    return RatedLine(
        subscription_id=f"sub-{i:05d}", customer=f"cust-{i:05d}", period_start_ms=start,
        period_end_ms=end, line_id=line_id, kind="usage", segment_start_ms=start,
        segment_end_ms=end, plan_id="pro", plan_version=1, meter="api_calls",
        aggregation="count", quantity=Decimal(1000 + i), currency=currency,
        amount=Decimal(amount if amount is not None else f"{i}.{i % 100:02d}"),
        amount_exact=str(i), proration_num=1, proration_den=1, tiers="1", price_model="per_unit",
        status=status,  # type: ignore[arg-type]
        correction=correction, corrects=line_id if correction else "")


class FakeClock:
    """Integer UTC milliseconds that move only when a test (or a backoff sleep) says so."""

    def __init__(self, ms: int = 1_800_000_000_000) -> None:
        self.ms = ms

    def now(self) -> int:
        return self.ms

    def sleep(self, seconds: float) -> None:
        self.ms += max(1, int(seconds * 1000))
