"""``[server]`` settings of ``meterline serve``; ``from_config`` reports every error at once.

    [server]
    host = "127.0.0.1"
    port = 8080
    pipeline = "embedded"          # or "kafka": HTTP front only, events into [kafka] topic
    local_log = "var/local-log.db" # embedded: default beside the chDB data dir
    local_log_fsync = false        # true: every commit is fsynced (survives power loss)
    keys_file = "var/meterline-keys.db"   # default beside the chDB data dir
    max_body_bytes = 8388608       # 413 above
    max_events_per_request = 20000 # 413 above
    max_pending_events = 200000    # accepted, not yet durable; 503 + Retry-After above
    raw_insert_interval_ms = 500   # embedded: a caught-up raw stage inserts at most this often
    topic_partitions = 6           # `meterline topics create`: usage + output topics
    topic_replication_factor = 3   # default: 3, or the number of brokers if fewer
    topic_retention_ms = 604800000 # 7 days: how long a stopped stage can still resume
    anomalies = true               # embedded: run the anomaly detectors on the rollups
    anomaly_settings = "anomalies.toml"  # optional: [detector], [stage], [webhook]

    [[server.quotas]]              # limits for GET /api/v1/quota (plans will add more)
    meter = "api_calls"
    limit = "100000"               # exact: an integer or a decimal string
    period = "month"               # or "day" (UTC)
    # tenant = "acme"              # optional: only this tenant ...
    # customer = "cust-42"         # ... and only this customer of it
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterline.core.errors import ConfigError
from meterline.server.usage import QuotaRule, parse_quota_rules

_INTS = {"port": (0, 65535), "max_body_bytes": (1024, 1 << 31),
         "max_events_per_request": (1, 1_000_000), "max_pending_events": (1, 100_000_000),
         "raw_insert_interval_ms": (0, 60_000),
         "topic_partitions": (1, 10_000), "topic_replication_factor": (1, 32),
         # at least an hour; -1 is Kafka's "forever" (checked separately below)
         "topic_retention_ms": (3_600_000, 1 << 62)}


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    pipeline: str = "embedded"
    local_log: Path = Path("var/local-log.db")
    local_log_fsync: bool = False
    keys_file: Path = Path("var/meterline-keys.db")
    max_body_bytes: int = 8 * 1024 * 1024
    max_events_per_request: int = 20_000
    max_pending_events: int = 200_000
    # Embedded: fewer, larger raw-events inserts, so HTTP answers wait less behind chDB.
    raw_insert_interval_ms: int = 500
    quotas: list[QuotaRule] = field(default_factory=list)
    topic_partitions: int = 6
    topic_replication_factor: int | None = None  # None: min(3, brokers in the cluster)
    topic_retention_ms: int = 7 * 24 * 3_600_000
    # Embedded: the anomaly detectors ride on the rollup stage, as in `rollup-local`
    # (on by default there too: docs/anomalies.md); built-in settings without a file.
    anomalies: bool = True
    anomaly_settings: Path | None = None


def beside_data_dir(config: Any, name: str) -> Path:
    """``<parent of the chDB data dir>/<name>``: next to the data, not inside the directory
    chDB owns. With a ClickHouse server URL (no data dir), under ./var."""
    data_dir = config.storage.data_dir if not config.storage.url else None
    return (Path(data_dir).parent if data_dir else Path("var")) / name


def from_config(config: Any) -> ServerSettings:
    raw: dict[str, Any] = dict(config.server)
    errors: list[str] = []
    known = {"host", "port", "pipeline", "local_log", "local_log_fsync", "keys_file",
             "max_body_bytes", "max_events_per_request", "max_pending_events",
             "raw_insert_interval_ms", "quotas",
             "topic_partitions", "topic_replication_factor", "topic_retention_ms",
             "anomalies", "anomaly_settings"}
    errors += [f"[server] unknown key {k!r} (known: {', '.join(sorted(known))})"
               for k in sorted(set(raw) - known)]
    values: dict[str, Any] = {}
    for name, (low, high) in _INTS.items():
        if name == "topic_retention_ms" and raw.get(name) == -1:
            values[name] = -1
        elif name in raw:
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                errors.append(f"[server] {name} must be an int in {low}..{high}, got {value!r}")
            else:
                values[name] = value
    if "host" in raw:
        if isinstance(raw["host"], str) and raw["host"]:
            values["host"] = raw["host"]
        else:
            errors.append("[server] host must be a non-empty string")
    pipeline = raw.get("pipeline", "embedded")
    if pipeline not in ("embedded", "kafka"):
        errors.append(f"[server] pipeline must be 'embedded' or 'kafka', got {pipeline!r}")
    values["pipeline"] = pipeline
    for name in ("local_log", "keys_file"):
        if name in raw:
            if isinstance(raw[name], str) and raw[name]:
                values[name] = Path(raw[name])
            else:
                errors.append(f"[server] {name} must be a path string")
    values.setdefault("local_log", beside_data_dir(config, "local-log.db"))
    values.setdefault("keys_file", beside_data_dir(config, "meterline-keys.db"))
    if "anomalies" in raw:
        if isinstance(raw["anomalies"], bool):
            values["anomalies"] = raw["anomalies"]
        else:
            errors.append("[server] anomalies must be true or false")
    if "anomaly_settings" in raw:
        if isinstance(raw["anomaly_settings"], str) and raw["anomaly_settings"]:
            values["anomaly_settings"] = Path(raw["anomaly_settings"])
        else:
            errors.append("[server] anomaly_settings must be a path string")
    if "local_log_fsync" in raw:
        if isinstance(raw["local_log_fsync"], bool):
            values["local_log_fsync"] = raw["local_log_fsync"]
        else:
            errors.append("[server] local_log_fsync must be true or false")
    try:
        registry = config.registry()
    except ConfigError as exc:
        errors += exc.errors
    else:
        rules, quota_errors = parse_quota_rules(raw.get("quotas"), registry)
        errors += quota_errors
        values["quotas"] = rules
    if errors:
        raise ConfigError(errors, "[server]")
    return ServerSettings(**values)
