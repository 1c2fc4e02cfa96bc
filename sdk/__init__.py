"""Meterline emitter SDK: record billable usage from your application.

    from meterline.sdk import Emitter
    with Emitter(bootstrap_servers="127.0.0.1:9092", topic="meterline.usage") as meter:
        meter.emit("cust-42", "api_calls", 1, dimensions={"endpoint": "/v1/search"})
"""

from meterline.core.errors import ConfigError, InvalidEventError
from meterline.core.meters import MeterRegistry
from meterline.sdk.config import EmitterConfig
from meterline.sdk.emitter import BufferFullError, Emitter, EmitterStats
from meterline.sdk.metrics import register_metrics
from meterline.sdk.spool import SpoolLockedError
from meterline.sdk.transport import KafkaTransport, MemoryTransport, Transport

__all__ = [
    "BufferFullError",
    "ConfigError",
    "Emitter",
    "EmitterConfig",
    "EmitterStats",
    "InvalidEventError",
    "KafkaTransport",
    "MemoryTransport",
    "MeterRegistry",
    "SpoolLockedError",
    "Transport",
    "register_metrics",
]
