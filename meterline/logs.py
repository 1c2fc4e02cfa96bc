"""Logging for every long-running command: text for people, JSON lines for machines.

``meterline --log-format json ...`` (or ``METERLINE_LOG_FORMAT=json``) writes one JSON object
per line to stderr::

    {"ts_ms": 1764576000123, "level": "ERROR", "logger": "meterline.aggregators.processor",
     "message": "...", "topic": "meterline.usage", "partition": 3, "offset": 81234,
     "batch_id": "b-...", "exc": "Traceback ..."}

Where a record came from travels as logging ``extra`` fields, built with :func:`where` so
the names are the same in every stage (``topic``, ``partition``, ``offset``, ``batch_id``):
an operator greps or queries one field name whichever stage logged the error. Text logs
append the same fields as ``key=value`` so nothing is lost without JSON.

Secrets never reach a log line. :class:`RedactSecrets` sits on the handler (so it also
covers librdkafka's and Faust's loggers, which we do not control) and masks passwords in
URLs (``http://user:***@host``), ``password=``/``secret=``/``token=`` style pairs, bearer
tokens and Stripe-style API keys, in the message, its arguments and the extra fields.
Masking happens on the formatted text, so a secret inside an exception message or a
``repr`` of a config object is caught too.
"""

from __future__ import annotations

import logging
import logging.config
import os
import re
import traceback
from typing import Any

import orjson

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "RedactSecrets",
    "TextFormatter",
    "configure_logging",
    "logging_config",
    "redact",
    "where",
]

LOG_FORMATS = ("text", "json")
CONTEXT_FIELDS = ("topic", "partition", "offset", "batch_id")

# Attributes every LogRecord has: anything else on a record came in through ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}

_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+(?P<post>@)"),
     r"\g<pre>***\g<post>"),
    # password=..., sasl.password: '...', "api_key": "...", client_secret=...
    (re.compile(r"(?i)(?P<pre>[\"']?[\w.-]*(?:password|passwd|secret|token|api[_-]?key)"
                r"[\"']?\s*[:=]\s*[\"']?)[^\"'\s,;&}]+"), r"\g<pre>***"),
    (re.compile(r"(?i)(?P<pre>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]+"), r"\g<pre>***"),
    # Stripe (sk_live_..., rk_test_..., whsec_...) and similar prefixed keys
    (re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{6,}|\bwhsec_[A-Za-z0-9]{6,}"), "***"),
)


def redact(text: str) -> str:
    """``text`` with every secret the patterns know masked."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def where(topic: str | None = None, partition: int | None = None, offset: int | None = None,
          batch_id: str | None = None) -> dict[str, Any]:
    """``extra=`` fields saying where a logged problem came from (``None`` ones left out)."""
    fields = {"topic": topic, "partition": partition, "offset": offset, "batch_id": batch_id}
    return {k: v for k, v in fields.items() if v is not None}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items()
            if k not in _STANDARD and not k.startswith("_")}


class RedactSecrets(logging.Filter):
    """Masks secrets in place (message, args and extra fields) before any formatter runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what we have, never drop the record
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        for key, value in _extra(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info and record.exc_info[0] is not None:
            # Tracebacks quote exception messages, which may quote a URL with a password.
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts_ms": int(record.created * 1000),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extra(record).items():
            doc[key] = value if isinstance(value, str | int | float | bool) or value is None \
                else repr(value)
        exc = record.exc_text or (self.formatException(record.exc_info) if record.exc_info
                                  else None)
        if exc:
            doc["exc"] = exc
        return orjson.dumps(doc).decode()


class TextFormatter(logging.Formatter):
    """The usual one-line format, with the ``extra`` fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extra(record)
        if not extra:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        fields = " ".join(f"{k}={v}" for k, v in extra.items())
        return f"{head} [{fields}]{sep}{tail}"


def logging_config(log_format: str, level: int | str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document; Faust's worker takes the same one."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}: {log_format!r}")
    formatter = "meterline.logs.JsonFormatter" if log_format == "json" \
        else "meterline.logs.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"meterline": {"()": formatter}},
        "filters": {"redact": {"()": "meterline.logs.RedactSecrets"}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "meterline",
                                 "filters": ["redact"], "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["default"]},
    }


def configure_logging(log_format: str | None = None, level: int | str = logging.WARNING) -> str:
    """Install the handler on the root logger; returns the format used. ``None`` reads
    ``METERLINE_LOG_FORMAT`` (default text)."""
    chosen = log_format or os.environ.get("METERLINE_LOG_FORMAT") or "text"
    logging.config.dictConfig(logging_config(chosen, level))
    # Stages started in other ways (Faust's worker re-configures logging) read it back.
    os.environ["METERLINE_LOG_FORMAT"] = chosen
    return chosen
