"""A partitioned stream of usage batches with the faults a real one has, and its truth.

For the end-to-end tests and benchmarks of the rollup stage: batches keyed to partitions
the way the SDK does it (murmur2 of the customer), event times moving forward with jitter
(as live traffic does, so the watermark behaves), whole batches resent (SDK retry, spool
replay), client retries under an explicit idempotency key in later batches (count once)
and the same key reused on another meter or customer (counts: the scope is
(customer, meter, id)). ``Truth`` folds every
*distinct* event independently of the rollup code, for the default meters.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from meterline.core.envelope import Batch, encode_batch
from meterline.core.partitioning import partition_for
from meterline.core.quantity import SCALE
from meterline.core.windows import DAY_MS, HOUR_MS

# meter -> aggregation, as in meterline/default_meters.toml
METERS = {"api_calls": "count", "llm_tokens": "sum", "storage_gb": "max",
          "compute_seconds": "sum", "active_users": "unique_count"}
DIMENSIONS = {"api_calls": ("endpoint", ("/v1/a", "/v1/b")), "llm_tokens": ("model", ("s", "l")),
              "storage_gb": ("region", ("eu", "us")), "compute_seconds": ("tier", ("std", "pri"))}


@dataclass
class Truth:
    """Exact expected window values: {(customer, meter, group_key, window_start_ms): nanos}
    (``group_key`` as in ``meterline.core.outputs.group_key``)."""

    hourly: dict[tuple[str, str, str, int], int] = field(default_factory=dict)
    daily: dict[tuple[str, str, str, int], int] = field(default_factory=dict)
    events: int = 0
    _unique: dict[tuple[str, str, str, int, str], set[str]] = field(default_factory=dict)

    def add(self, customer: str, meter: str, nanos: int, ts: int,
            dims: dict[str, str]) -> None:
        self.events += 1
        agg = METERS[meter]
        user = dims.get("user_id")
        group = "" if meter == "active_users" else "&".join(f"{k}={v}" for k, v in dims.items())
        for table, start, name in ((self.hourly, ts - ts % HOUR_MS, "h"),
                                   (self.daily, ts - ts % DAY_MS, "d")):
            key = (customer, meter, group, start)
            if agg == "unique_count":
                users = self._unique.setdefault((*key, name), set())
                users.add(str(user))
                table[key] = len(users) * SCALE
            elif agg == "count":
                table[key] = table.get(key, 0) + SCALE
            elif agg == "max":
                table[key] = max(table.get(key, nanos), nanos)
            else:
                table[key] = table.get(key, 0) + nanos


@dataclass(frozen=True, slots=True)
class Record:
    partition: int
    payload: bytes
    resend: bool


def usage_records(events: int, customers: int, partitions: int, *, start_ms: int,
                  events_per_batch: int = 500, ms_per_batch: int = 1_000,
                  resend_rate: float = 0.03, explicit_id_rate: float = 0.02,
                  duplicate_id_rate: float = 0.3, jitter_ms: int = 30 * 60_000,
                  seed: int = 11, truth: Truth | None = None,
                  one_customer_per_envelope: bool = False) -> Iterator[Record]:
    """Yield records in send order. Event times start at ``start_ms`` and advance
    ``ms_per_batch`` per batch; each event is up to ``jitter_ms`` older than its batch
    (inside the default allowed lateness, so nothing here is too late).

    ``one_customer_per_envelope``: the low-cardinality shape (one app instance emitting
    for its own customer): each round picks one customer per partition and every new
    event of the round goes to one of them, and a client retry re-sends an event of the
    same customer, so every envelope holds one customer."""
    rng = random.Random(seed)
    names = [f"cust-{i:05d}" for i in range(customers)]
    part_of = {c: partition_for(c, partitions) for c in names}
    in_part: dict[int, list[str]] = {}
    for c in names:
        in_part.setdefault(part_of[c], []).append(c)
    parts = sorted(in_part)
    sent: list[Record] = []
    # Events sent under an explicit id: (customer, meter, nanos, ts, dims, id).
    with_ids: list[tuple[str, str, int, int, dict[str, str], str]] = []
    scopes: set[tuple[str, str, str]] = set()  # (customer, meter, id) already sent
    made = 0
    b = 0
    while made < events:
        clock = start_ms + b * ms_per_batch
        n = min(events_per_batch, events - made)
        by_part: dict[int, list[tuple]] = {}
        round_names = ([rng.choice(in_part[p]) for p in parts] if one_customer_per_envelope
                       else names)
        for _ in range(n):
            c = round_names[rng.randrange(len(round_names))]
            meter = rng.choice(tuple(METERS))
            ts = clock - rng.randrange(jitter_ms)
            if meter in ("api_calls", "active_users"):
                q = SCALE
            elif meter == "compute_seconds":
                q = rng.randrange(1, 120_000) * 10**6  # 0.001 s steps
            else:
                q = rng.randrange(1, 5_000) * SCALE
            if meter == "active_users":
                dims = {"user_id": f"u{rng.randrange(300)}"}
            else:
                dim, values = DIMENSIONS[meter]
                dims = {dim: rng.choice(values)}
                if meter == "api_calls":  # its group_by is (endpoint, region)
                    dims["region"] = rng.choice(("eu", "us"))
            eid = None
            distinct = True
            if with_ids and rng.random() < explicit_id_rate * duplicate_id_rate:
                # Recent ones: a retry comes soon, inside the allowed lateness (an old
                # retry would be a late event, another path).
                pool = with_ids[-200:]
                if one_customer_per_envelope:
                    # One app instance retries its own customer's events only.
                    pool = [w for w in with_ids[-5_000:] if w[0] == c] or [
                        (c, meter, q, ts, dims, f"{c}|k{made}")]
                original = rng.choice(pool)
                if rng.random() < 0.8:
                    # A client retry: the same event under the same idempotency key, in a
                    # later batch. Counts once.
                    c, meter, q, ts, dims, eid = original
                else:
                    # The same key on another meter of the same customer (one request id
                    # for two meters) or for another customer: the idempotency scope is
                    # (customer, meter, id), so this is a new event and counts.
                    eid = original[5]
                    if meter == original[1] and c == original[0]:
                        meter = next(m for m in METERS if m != original[1]
                                     and METERS[m] in ("sum", "count")
                                     and m in DIMENSIONS)
                        dim, values = DIMENSIONS[meter]
                        dims = {dim: values[0]}
                        if meter == "api_calls":
                            dims["region"] = "eu"
                        q = SCALE if meter == "api_calls" else q
                    with_ids.append((c, meter, q, ts, dims, eid))
            elif rng.random() < explicit_id_rate:
                eid = f"{c}|k{made}"
                with_ids.append((c, meter, q, ts, dims, eid))
            if eid is not None:
                # The first event sent under a scope counts; a later one (a retry, or a
                # reuse that happened to pick a scope already sent) does not.
                distinct = (c, meter, eid) not in scopes
                scopes.add((c, meter, eid))
            if distinct and truth is not None:
                truth.add(c, meter, q, ts, dims)
            by_part.setdefault(part_of[c], []).append((c, meter, q, ts, eid, dims))
            made += 1
        for p, evs in sorted(by_part.items()):
            batch = Batch(f"b{seed}-{b:07d}-p{p}", clock, [e[0] for e in evs],
                          [e[1] for e in evs], [e[2] for e in evs], [e[3] for e in evs],
                          ids=[e[4] for e in evs], dimensions=[e[5] for e in evs])
            rec = Record(p, encode_batch(batch), False)
            sent.append(rec)
            yield rec
            if rng.random() < resend_rate:
                old = rng.choice(sent[-50:])
                yield Record(old.partition, old.payload, True)
        b += 1
