"""Application config: one TOML file, environment overrides, every error reported at once.

    [kafka]
    bootstrap_servers = "127.0.0.1:9092"
    topic = "meterline.usage"
    group_id = "meterline-raw"

    [storage]
    data_dir = "var/chdb"          # embedded chDB (default) ...
    # url = "http://user:pass@clickhouse:8123/meterline"   # ... or a ClickHouse server
    database = "meterline"

    [retention]                    # days; see meterline.sinks.schema.RetentionPolicy
    raw_events_days = 35
    [retention.meters.storage_gb]  # per meter: raw_events, late_events, *_rollups days
    raw_events_days = 90

    [meters]
    file = "meters.toml"           # default: the demo meters shipped with Meterline

    [rollups]                      # `meterline worker`; see docs/rollups.md
    group_id = "meterline-rollups"
    allowed_lateness_ms = 7200000  # 2 h after a window's end (by the watermark)
    watermark_delay_ms = 60000     # watermark = newest event time of the partition - this
    dedupe_horizon_ms = 86400000   # 24 h of log time: a resent batch or event id counts once
                                   # within it, and always while its window is open
    flush_interval_s = 0.5         # changed windows are written at least this often
    checkpoint_interval_s = 5.0    # after a crash, at most about this much is replayed
    engine = "columnar"            # or "per-event" (the reference fold); same results

Environment: METERLINE_KAFKA_BOOTSTRAP, METERLINE_TOPIC, METERLINE_CLICKHOUSE_URL,
METERLINE_DATA_DIR, METERLINE_ROLLUP_GROUP, METERLINE_FLUSH_INTERVAL_S,
METERLINE_CHECKPOINT_INTERVAL_S, METERLINE_ROLLUP_ENGINE override the file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from meterline.core.dedupe import DEFAULT_DEDUPE_HORIZON_MS
from meterline.core.errors import ConfigError
from meterline.core.lateness import DEFAULT_ALLOWED_LATENESS_MS, DEFAULT_WATERMARK_DELAY_MS
from meterline.core.meters import MeterRegistry

DEFAULT_METERS = Path(__file__).with_name("default_meters.toml")


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "meterline.usage"
    group_id: str = "meterline-raw"


@dataclass(frozen=True)
class StorageSettings:
    data_dir: str | None = "var/chdb"
    url: str | None = None
    database: str = "meterline"


@dataclass(frozen=True)
class RollupConfig:
    group_id: str = "meterline-rollups"
    allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS
    watermark_delay_ms: int = DEFAULT_WATERMARK_DELAY_MS
    dedupe_horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS
    flush_interval_s: float = 0.5
    checkpoint_interval_s: float = 5.0
    # How the rollup stage folds records (aggregators/runner.py): "columnar" or "per-event".
    engine: str = "columnar"

    def errors(self) -> list[str]:
        out = []
        if self.engine not in ("columnar", "per-event"):
            out.append(f"[rollups] engine must be \"columnar\" or \"per-event\", "
                       f"got {self.engine!r}")
        if not isinstance(self.group_id, str) or not self.group_id:
            out.append("[rollups] group_id must be a non-empty string")
        for name in ("allowed_lateness_ms", "watermark_delay_ms", "dedupe_horizon_ms"):
            value = getattr(self, name)
            least = 1 if name == "dedupe_horizon_ms" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                out.append(f"[rollups] {name} must be an int >= {least} (milliseconds), "
                           f"got {value!r}")
        for name in ("flush_interval_s", "checkpoint_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                out.append(f"[rollups] {name} must be a number > 0 (seconds), got {value!r}")
        # No check relates the horizon to the lateness settings: they run on different
        # clocks (log time vs the event-time watermark), so no such inequality can hold on
        # a partition whose watermark stalls. What holds instead (core/dedupe.py): an id is
        # kept until its horizon has passed *and* its window has closed, so a resend never
        # counts twice in an open window whatever the horizon; the horizon only decides how
        # long a resend to a closed window is recognised rather than sent to late_events.
        return out


@dataclass(frozen=True)
class AppConfig:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    # RetentionPolicy keyword arguments: ``*_days`` ints and ``meters`` {meter: {field: days}}
    retention: dict[str, Any] = field(default_factory=dict)
    meters_file: Path = DEFAULT_METERS
    rollups: RollupConfig = field(default_factory=RollupConfig)
    # [server]: `meterline serve`; checked by meterline.server.settings (every error at once)
    server: dict[str, Any] = field(default_factory=dict)

    def storage_config(self) -> Any:
        from meterline.sinks.storage import StorageConfig

        s = self.storage
        return StorageConfig(url=s.url or None, data_dir=None if s.url else s.data_dir,
                             database=s.database)

    def retention_policy(self) -> Any:
        from meterline.sinks.schema import RetentionPolicy

        return RetentionPolicy(**self.retention)

    def registry(self) -> MeterRegistry:
        return MeterRegistry.load(self.meters_file)


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> AppConfig:
    env = dict(os.environ if env is None else env)
    doc: dict[str, Any] = {}
    errors: list[str] = []
    source = str(path) if path else "defaults"
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([str(exc)], source) from None
    known = {"kafka", "storage", "retention", "meters", "rollups", "server"}
    errors += [f"unknown section [{k}]" for k in sorted(set(doc) - known)]
    kafka = _section(doc, "kafka", KafkaSettings, errors)
    storage = _section(doc, "storage", StorageSettings, errors)
    if "METERLINE_KAFKA_BOOTSTRAP" in env:
        kafka["bootstrap_servers"] = env["METERLINE_KAFKA_BOOTSTRAP"]
    if "METERLINE_TOPIC" in env:
        kafka["topic"] = env["METERLINE_TOPIC"]
    if env.get("METERLINE_CLICKHOUSE_URL"):
        storage["url"] = env["METERLINE_CLICKHOUSE_URL"]
    if "METERLINE_DATA_DIR" in env:
        storage["data_dir"] = env["METERLINE_DATA_DIR"]
    retention = _retention_section(doc.get("retention", {}), errors)
    meters = doc.get("meters", {})
    meters_file = DEFAULT_METERS
    if isinstance(meters, dict) and "file" in meters:
        base = Path(path).parent if path else Path.cwd()
        meters_file = (base / str(meters["file"])).resolve()
        if not meters_file.is_file():
            errors.append(f"[meters] file {meters_file} does not exist")
    rollups = _rollups(doc, env, errors)
    server = doc.get("server", {})
    if not isinstance(server, dict):
        errors.append("[server] must be a table")
        server = {}
    config = AppConfig(
        server=server,
        rollups=rollups,
        kafka=KafkaSettings(**kafka),
        storage=StorageSettings(**storage),
        retention=retention,
        meters_file=meters_file,
    )
    try:
        config.retention_policy().validate()
    except (TypeError, ValueError) as exc:  # ConfigError / SinkConfigError carry .errors
        errors += [f"[retention] {e}" for e in getattr(exc, "errors", [str(exc)])]
    overridden = sorted(retention.get("meters", {}))
    if overridden and meters_file.is_file():
        # A typo in a meter name would silently keep that meter's data for the default
        # time; a broken meters file is reported by whoever loads the registry.
        try:
            known = set(MeterRegistry.load(meters_file).names)
        except (TypeError, ValueError):
            known = set(overridden)
        errors += [f"[retention.meters.{m}] no meter {m!r} in {meters_file}"
                   for m in overridden if m not in known]
    if errors:
        raise ConfigError(errors, source)
    return config


def _retention_section(raw: Any, errors: list[str]) -> dict[str, Any]:
    """``[retention]`` -> RetentionPolicy kwargs. Only shapes are checked here; values
    (types, ranges, which fields a meter may set) are RetentionPolicy.validate()'s job."""
    from meterline.sinks.schema import RetentionPolicy

    if not isinstance(raw, dict):
        errors.append("[retention] must be a table")
        return {}
    out: dict[str, Any] = {}
    allowed = RetentionPolicy.day_fields()
    for key, value in raw.items():
        if key == "meters":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                errors.append("[retention.meters] must hold one table per meter, "
                              "e.g. [retention.meters.storage_gb]")
            else:
                out["meters"] = {m: dict(t) for m, t in value.items()}
        elif key in allowed:
            out[key] = value
        else:
            errors.append(f"[retention] unknown key {key!r} "
                          f"(known: {', '.join(allowed)}, [retention.meters.<meter>])")
    return out


def _section(doc: dict[str, Any], name: str, cls: type, errors: list[str]) -> dict[str, Any]:
    raw = doc.get(name, {})
    if not isinstance(raw, dict):
        errors.append(f"[{name}] must be a table")
        return {}
    allowed = {f.name for f in fields(cls)}
    for key in sorted(set(raw) - allowed):
        errors.append(f"[{name}] unknown key {key!r} (known: {', '.join(sorted(allowed))})")
    out = {k: v for k, v in raw.items() if k in allowed}
    for key, value in out.items():
        if value is not None and not isinstance(value, str):
            errors.append(f"[{name}] {key} must be a string")
    return out


_ROLLUP_ENV = {"METERLINE_ROLLUP_GROUP": ("group_id", str),
               "METERLINE_FLUSH_INTERVAL_S": ("flush_interval_s", float),
               "METERLINE_CHECKPOINT_INTERVAL_S": ("checkpoint_interval_s", float),
               "METERLINE_ROLLUP_ENGINE": ("engine", str)}


def _rollups(doc: dict[str, Any], env: dict[str, str], errors: list[str]) -> RollupConfig:
    raw = doc.get("rollups", {})
    if not isinstance(raw, dict):
        errors.append("[rollups] must be a table")
        raw = {}
    allowed = {f.name for f in fields(RollupConfig)}
    errors += [f"[rollups] unknown key {k!r} (known: {', '.join(sorted(allowed))})"
               for k in sorted(set(raw) - allowed)]
    values = {k: v for k, v in raw.items() if k in allowed}
    for var, (name, kind) in _ROLLUP_ENV.items():
        if var in env:
            try:
                values[name] = kind(env[var])
            except ValueError:
                errors.append(f"{var} must be a {kind.__name__}, got {env[var]!r}")
    config = RollupConfig(**values)
    found = config.errors()
    errors += found
    return RollupConfig() if found else config
