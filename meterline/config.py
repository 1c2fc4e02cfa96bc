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

Environment: METERLINE_KAFKA_BOOTSTRAP, METERLINE_TOPIC, METERLINE_CLICKHOUSE_URL,
METERLINE_DATA_DIR override the file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from meterline.core.errors import ConfigError
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
class AppConfig:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    # RetentionPolicy keyword arguments: ``*_days`` ints and ``meters`` {meter: {field: days}}
    retention: dict[str, Any] = field(default_factory=dict)
    meters_file: Path = DEFAULT_METERS

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
    known = {"kafka", "storage", "retention", "meters"}
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
    config = AppConfig(
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
