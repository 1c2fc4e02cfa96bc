"""Operating Meterline on Kafka: is the broker there, and are the topics right?

- ``require_kafka``: the commands that need Kafka (``serve --kafka``, ``worker``,
  ``load-raw``, ``load-rollups``, ``anomalies``) call it first, so an unreachable broker is
  one line naming the address and a non-zero exit (``KafkaUnreachable``, caught by the
  CLI), not a traceback after 30 s or a stream of librdkafka ERROR lines.
- ``meterline topics create``: the usage topic and the rollup worker's output topics with
  the settings the pipeline needs, and a refusal (``TopicProblem``) with the reason when an
  existing topic contradicts them.

Why every topic gets ``message.timestamp.type=LogAppendTime``: the rollup stage keeps
event time from the envelope for windows, but uses the *record* timestamp as its
replayable processing clock (dedupe expiry, docs/rollups.md "Two clocks, one horizon").
With CreateTime a producer's clock would drive dedupe expiry, and a client with a wrong
clock could make a resend count twice; the broker's append time is the one clock every
replay sees the same. The output topics carry the same setting so their record times are
the worker's, as the benchmarks and crash tests run them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meterline.core.errors import MeterlineError

__all__ = ["KafkaUnreachable", "TopicPlan", "TopicProblem", "create_topics", "plan_topics",
           "require_kafka", "usage_topic_problem"]

TIMESTAMP_TYPE = "message.timestamp.type"
LOG_APPEND_TIME = "LogAppendTime"
# How long to wait for a broker that does not answer at all (a black-holed address); a
# refused connection or an unknown host is reported as soon as librdkafka gives up on
# every bootstrap broker, well within a second.
CONNECT_TIMEOUT_S = 10.0
# Kafka's own default (168 h): how long the usage topic keeps records. It must cover the
# longest a stage can be down and still resume (the worker stops loudly on a gap).
DEFAULT_RETENTION_MS = 7 * 24 * 3_600_000
DEFAULT_PARTITIONS = 6


class KafkaUnreachable(MeterlineError):
    """No broker at the configured address answered."""


class TopicProblem(MeterlineError):
    """An existing topic contradicts what the pipeline needs; the message says what to do."""


class _Quiet(logging.Logger):
    """librdkafka's own log lines ("Connect to ipv4#... failed", repeated every second)
    say nothing the one error line does not: drop them while probing."""

    def __init__(self) -> None:
        super().__init__("meterline.kafka.probe", logging.CRITICAL + 1)


def _admin(bootstrap: str, errors: list[str] | None = None) -> Any:
    from confluent_kafka.admin import AdminClient

    def on_error(err: Any) -> None:
        if errors is not None:
            errors.append(f"{err.name()}: {err.str()}")

    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _Quiet(),
                            "error_cb": on_error, "socket.connection.setup.timeout.ms": 5000}
    return AdminClient(conf)


def require_kafka(bootstrap: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """Cluster metadata, or ``KafkaUnreachable`` naming ``bootstrap``: as soon as every
    bootstrap broker is known down, else after ``timeout_s`` without an answer."""
    from confluent_kafka import KafkaError, KafkaException

    errors: list[str] = []
    admin = _admin(bootstrap, errors)
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            return admin.list_topics(timeout=0.5)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            last = str(err.str() if isinstance(err, KafkaError) else exc)
        admin.poll(0)  # serves error_cb: librdkafka reports "all brokers down" there
        down = [e for e in errors if e.startswith(("_ALL_BROKERS_DOWN", "_RESOLVE"))]
        if down or time.monotonic() >= deadline:
            why = (down[-1].split(": ", 1)[1] if down
                   else f"no answer within {timeout_s:g} s ({last})")
            raise KafkaUnreachable(
                f"cannot reach Kafka at {bootstrap}: {_short(why)}; is the broker running? "
                "(address: [kafka] bootstrap_servers or $METERLINE_KAFKA_BOOTSTRAP)")


def _short(text: str) -> str:
    return " ".join(text.split())[:200]


@dataclass(frozen=True)
class TopicPlan:
    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = field(default_factory=dict)
    role: str = "usage"


def plan_topics(usage_topic: str, *, partitions: int, replication_factor: int,
                retention_ms: int) -> list[TopicPlan]:
    """The usage topic and the worker's outputs (same partition count: the worker writes
    partition p's outputs to partition p). The compacted checkpoint topic is the worker's
    own (it creates it with the settings its store needs)."""
    from meterline.aggregators.outputs_io import output_topics

    errors = []
    if partitions < 1:
        errors.append(f"partitions must be >= 1, got {partitions}")
    if replication_factor < 1:
        errors.append(f"replication factor must be >= 1, got {replication_factor}")
    if retention_ms < 3_600_000 and retention_ms != -1:
        errors.append(f"retention must be at least one hour (or -1: forever), "
                      f"got {retention_ms} ms")
    if errors:
        raise TopicProblem("; ".join(errors))
    usage = {TIMESTAMP_TYPE: LOG_APPEND_TIME, "retention.ms": str(retention_ms)}
    outputs = {TIMESTAMP_TYPE: LOG_APPEND_TIME, "retention.ms": str(retention_ms)}
    plans = [TopicPlan(usage_topic, partitions, replication_factor, usage, "usage")]
    plans += [TopicPlan(name, partitions, replication_factor, outputs, role)
              for role, name in output_topics(usage_topic).items()]
    return plans


def usage_topic_problem(name: str, config: Mapping[str, str]) -> str | None:
    """Why the pipeline must not run on this usage topic, or None."""
    found = config.get(TIMESTAMP_TYPE)
    if found == LOG_APPEND_TIME:
        return None
    return (f"topic {name!r} has {TIMESTAMP_TYPE}={found}, not {LOG_APPEND_TIME}: the rollup "
            "stage's dedupe clock would follow each producer's clock (docs/rollups.md). "
            f"Set it with: kafka-configs.sh --bootstrap-server <broker> --alter --entity-type "
            f"topics --entity-name {name} --add-config {TIMESTAMP_TYPE}={LOG_APPEND_TIME} "
            "(it applies to records appended from then on)")


def describe_configs(bootstrap: str, names: Iterable[str], timeout_s: float = 30.0
                     ) -> dict[str, dict[str, str]]:
    from confluent_kafka.admin import ConfigResource

    admin = _admin(bootstrap)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    out: dict[str, dict[str, str]] = {}
    for resource, future in admin.describe_configs(resources,
                                                   request_timeout=timeout_s).items():
        entries = future.result(timeout_s)
        out[resource.name] = {k: v.value for k, v in entries.items()}
    return out


def check_usage_topic(bootstrap: str, topic: str, metadata: Any) -> None:
    """Refuse to run on a usage topic that is missing or not LogAppendTime."""
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise TopicProblem(f"usage topic {topic!r} not found on {bootstrap}; create it "
                           "with: meterline topics create")
    problem = usage_topic_problem(topic, describe_configs(bootstrap, [topic])[topic])
    if problem is not None:
        raise TopicProblem(problem)


def create_topics(bootstrap: str, plans: list[TopicPlan], metadata: Any,
                  timeout_s: float = 30.0) -> list[str]:
    """Check what exists, then create what is missing. One line per topic. When an
    existing topic has the wrong partition count or (usage topic) timestamp type,
    ``TopicProblem`` lists every contradiction and nothing is created: outputs made to
    match a usage topic that must be replaced would only have to be deleted again."""
    from confluent_kafka.admin import NewTopic

    brokers = len(metadata.brokers)
    too_few = [p for p in plans if p.replication_factor > brokers]
    if too_few:
        raise TopicProblem(f"replication factor {too_few[0].replication_factor} needs at "
                           f"least that many brokers; the cluster at {bootstrap} has {brokers}")
    existing = {p.name: metadata.topics[p.name] for p in plans
                if p.name in metadata.topics and metadata.topics[p.name].error is None}
    lines: list[str] = []
    problems: list[str] = []
    configs = describe_configs(bootstrap, list(existing), timeout_s) if existing else {}
    for plan in plans:
        if plan.name not in existing:
            continue
        have = len(existing[plan.name].partitions)
        if have != plan.partitions:
            problems.append(f"topic {plan.name!r} has {have} partitions, not {plan.partitions}"
                            + (": the partition count of a usage topic cannot change in "
                               "place (docs/sdk.md#changing-the-partition-count)"
                               if plan.role == "usage" else
                               ": the worker writes partition p's outputs to partition p"))
        problem = (usage_topic_problem(plan.name, configs.get(plan.name, {}))
                   if plan.role == "usage" else None)
        if problem is not None:
            problems.append(problem)
        if have == plan.partitions and problem is None:
            lines.append(f"exists  {plan.name} ({have} partitions, settings checked)")
    if problems:
        raise TopicProblem(f"refused, nothing created on {bootstrap}:\n"
                           + "\n".join(f"  {p}" for p in problems))
    admin = _admin(bootstrap)
    new = [NewTopic(p.name, p.partitions, p.replication_factor, config=dict(p.config))
           for p in plans if p.name not in existing]
    for name, future in (admin.create_topics(new, request_timeout=timeout_s).items()
                         if new else []):
        plan = next(p for p in plans if p.name == name)
        try:
            future.result(timeout_s)
        except Exception as exc:  # a concurrent create is fine; anything else is reported
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                problems.append(f"could not create {name!r}: {_short(str(exc))}")
                continue
        lines.append(f"created {name} ({plan.partitions} partitions, replication "
                     f"{plan.replication_factor}, "
                     + ", ".join(f"{k}={v}" for k, v in plan.config.items()) + ")")
    if problems:
        raise TopicProblem("\n".join(lines + [f"could not create every topic on {bootstrap}:"]
                                      + [f"  {p}" for p in problems]))
    return lines
