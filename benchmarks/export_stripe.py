"""Items/s from StripeTarget to stripe-mock, with bounded concurrency (issue 10).

Builds N export items (half usage lines that go as billing meter events, spread over
many customers so Stripe's one-call-per-customer-per-meter rule does not serialise them;
half base fees that go as invoice items), starts stripe-mock on a free loopback port
(built by tools/stripe-mock/install.sh) and times ``StripeTarget.send`` in batches.
Every result must be ``sent``.

``--via-proxy`` puts the recording proxy (meterline/testing/stripe_mock.py) in between and
then also checks that stripe-mock accepted every key exactly once; the proxy runs in this
process, so that figure is lower: it is a check, the direct one is the throughput.

    python benchmarks/export_stripe.py                          # 4,000 items, concurrency 8
    python benchmarks/export_stripe.py --items 500 --via-proxy  # small, verified
    python benchmarks/export_stripe.py --concurrency 1 16       # compare concurrencies

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import sys
import time
from decimal import Decimal

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from meterline.export.items import ExportItem, item_key  # noqa: E402
from meterline.export.stripe_target import StripeConfig, StripeTarget  # noqa: E402
from meterline.testing.stripe_mock import (  # noqa: E402
    TEST_API_KEY,
    RecordingProxy,
    StripeMock,
)

NOV_MS = calendar.timegm((2026, 11, 1, 0, 0, 0)) * 1000
DEC_MS = calendar.timegm((2026, 12, 1, 0, 0, 0)) * 1000


def make_items(n: int) -> list[ExportItem]:
    items = []
    for i in range(n):
        sub = f"sub-{i:06d}"
        usage = i % 2 == 0
        kind = "usage" if usage else "base_fee"
        line_id = f"{NOV_MS}/usage/api_calls:count" if usage else f"{NOV_MS}/base_fee"
        items.append(ExportItem(
            key=item_key(sub, NOV_MS, line_id, 0), customer=f"cus_bench{i:06d}",
            subscription_id=sub, period_start_ms=NOV_MS, period_end_ms=DEC_MS,
            line_id=line_id, correction=0, corrects="", kind=kind,
            meter="api_calls" if usage else "", aggregation="count" if usage else "",
            quantity=Decimal(1000 + i) if usage else Decimal(1),
            amount=Decimal("2.50") if usage else Decimal("30.00"), currency="USD",
            plan_id="pro", plan_version=1, segment_start_ms=NOV_MS, segment_end_ms=DEC_MS))
    return items


def run(api_base: str, items: list[ExportItem], concurrency: int, batch: int) -> dict:
    config = StripeConfig(api_key=TEST_API_KEY, api_base=api_base, concurrency=concurrency,
                          meters={"api_calls:count": "api_calls"})
    # "now" just after the period: every meter event is inside Stripe's 35-day window.
    with StripeTarget(config, clock_ms=lambda: DEC_MS + 3_600_000) as target:
        target.send(items[:concurrency])  # warm up connections (not counted)
        timed = items[concurrency:]
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = []
        for start in range(0, len(timed), batch):
            results.extend(target.send(timed[start:start + batch]))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    bad = [r for r in results if r.outcome != "sent"]
    if bad:
        raise SystemExit(f"{len(bad)} items not sent, e.g. {bad[0]}")
    return {"items": len(timed), "concurrency": concurrency, "seconds": round(wall, 3),
            "items_per_s": round(len(timed) / wall), "cpu_s": round(cpu, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8])
    parser.add_argument("--batch", type=int, default=500, help="items per send() call")
    parser.add_argument("--via-proxy", action="store_true")
    args = parser.parse_args()
    summary = []
    with StripeMock() as server:
        for concurrency in args.concurrency:
            items = make_items(args.items + concurrency)
            if args.via_proxy:
                with RecordingProxy(server.url) as proxy:
                    row = run(proxy.url, items, concurrency, args.batch)
                    counts = proxy.accepted_count_by_key()
                    if counts != {it.key: 1 for it in items}:
                        raise SystemExit("stripe-mock did not accept every key exactly once")
                    row["verified_exactly_once"] = True
            else:
                row = run(server.url, items, concurrency, args.batch)
            row["via_proxy"] = args.via_proxy
            print(f"concurrency {concurrency:>3}: {row['items']} items in {row['seconds']} s "
                  f"= {row['items_per_s']} items/s (CPU {row['cpu_s']} s)", flush=True)
            summary.append(row)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
