"""What the SDK-backed targets (Stripe, Chargebee) share: config errors and loading,
secret redaction in results and in the SDK's own log records, and a bounded thread pool.

Each SDK target keeps its own rules (what goes where, how an answer is classified); this
module holds only the plumbing that was the same line for line in both, so a fix to how a
secret is kept out of a log lands once.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Self

from meterline.export.items import ExportItem, SendResult

__all__ = ["MAX_RESPONSE", "PooledSdkTarget", "RedactingLogFilter", "TargetConfigError",
           "check_known", "failed", "load_table", "pool_errors", "redact_secrets"]

# A response text for the ledger: enough for the target's message, not a whole body.
MAX_RESPONSE = 300


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


class TargetConfigError(ValueError):
    """Every problem of a target's config at once (``errors``); never quotes a key."""

    target = "export target"

    def __init__(self, errors: list[str]) -> None:
        super().__init__(f"invalid {self.target} export config:\n  " + "\n  ".join(errors))
        self.errors = errors


def pool_errors(timeout_s: object, concurrency: object, max_concurrency: int) -> list[str]:
    errors: list[str] = []
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) \
            or not timeout_s > 0:
        errors.append(f"timeout_s: must be > 0, got {timeout_s!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) \
            or not 1 <= concurrency <= max_concurrency:
        errors.append(f"concurrency: must be 1..{max_concurrency}, got {concurrency!r}")
    return errors


def load_table(path: str | Path, table: str) -> dict[str, Any]:
    """The ``[table]`` of a TOML file (empty when absent)."""
    with open(path, "rb") as f:
        return dict(tomllib.load(f).get(table, {}))


def check_known(data: Mapping[str, Any], known: set[str],
                error: type[TargetConfigError]) -> dict[str, Any]:
    """The known settings of ``data``; an unknown one (a typo, or a key that belongs in
    the environment) is an error, not silently ignored."""
    unknown = sorted(set(data) - known)
    if unknown:
        raise error([f"unknown setting {k!r} (known: {sorted(known)})" for k in unknown])
    return {k: data[k] for k in known if k in data}


class RedactingLogFilter(logging.Filter):
    """Installed on an SDK's logger: the SDKs log payloads and responses at DEBUG, and a
    record must not carry the API key out of the process."""

    def __init__(self, clean: Any) -> None:
        super().__init__()
        self._clean = clean  # str -> str

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self._clean(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


class PooledSdkTarget:
    """A target calling an SDK from ``concurrency`` worker threads, with the SDK logger
    filtered for the API key while the target is open. Subclasses set ``name``,
    ``sdk_logger`` and call :meth:`_open_pool` once their client is built."""

    name: ClassVar[str]
    sdk_logger: ClassVar[str]

    _pool: ThreadPoolExecutor
    _log_filter: RedactingLogFilter
    _secrets: tuple[str, ...]

    def _open_pool(self, concurrency: int, secrets: Sequence[str]) -> None:
        self._secrets = tuple(s for s in secrets if s)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"{self.name}-export")
        self._log_filter = RedactingLogFilter(self.redact)
        logging.getLogger(self.sdk_logger).addFilter(self._log_filter)

    def redact(self, text: str) -> str:
        """``text`` without this target's secrets (subclasses add SDK-specific shapes)."""
        return redact_secrets(text, self._secrets)

    def _clean(self, text: str) -> str:
        return self.redact(text)[:MAX_RESPONSE]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        logging.getLogger(self.sdk_logger).removeFilter(self._log_filter)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def failed(item: ExportItem, reason: str) -> SendResult:
    """A refusal decided before any call: nothing was sent."""
    return SendResult(item.key, "failed", None, reason)
