"""Structured logs: JSON lines with where a problem came from, and no secrets in any line."""

from __future__ import annotations

import io
import logging
import logging.config
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from meterline.logs import logging_config, redact, where

SECRETS = ("hunter2secret", "sk_live_51Habc123XYZ", "tok-9f8e7d6c5b", "s3cr3t-pw")


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """The production handler config, pointed at a buffer instead of stderr."""
    stream = io.StringIO()
    saved = logging.root.handlers[:], logging.root.level

    def install(fmt: str) -> None:
        config = logging_config(fmt, logging.INFO)
        logging.config.dictConfig(config)
        logging.root.handlers[0].setStream(stream)  # type: ignore[attr-defined]

    install("json")
    logger = logging.getLogger("meterline.test.logs")
    logger.install = install  # type: ignore[attr-defined]
    yield logger, stream
    logging.root.handlers[:] = saved[0]
    logging.root.setLevel(saved[1])


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines() if line]


def test_json_line_carries_where_fields_and_the_traceback(
        capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    try:
        raise RuntimeError("insert failed")
    except RuntimeError:
        logger.error("could not write flush of %s[%d]", "usage", 3, exc_info=True,
                     extra=where("usage", 3, 81234, "batch-7"))
    (line,) = _lines(stream)
    assert line["level"] == "ERROR" and line["logger"] == "meterline.test.logs"
    assert line["message"] == "could not write flush of usage[3]"
    assert (line["topic"], line["partition"], line["offset"], line["batch_id"]) == (
        "usage", 3, 81234, "batch-7")
    assert isinstance(line["ts_ms"], int) and line["ts_ms"] > 1_600_000_000_000
    assert "RuntimeError: insert failed" in str(line["exc"])


def test_where_leaves_out_what_is_unknown() -> None:
    assert where("t", 0) == {"topic": "t", "partition": 0}
    assert where(offset=0) == {"offset": 0}  # 0 is a position, not "unknown"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_secret_reaches_a_line(capture: tuple[logging.Logger, io.StringIO], fmt: str) -> None:
    logger, stream = capture
    logger.install(fmt)  # type: ignore[attr-defined]
    logger.warning("connecting to %s", "http://admin:hunter2secret@ch.internal:8123/db")
    logger.warning("stripe key sk_live_51Habc123XYZ rejected; retry with token=tok-9f8e7d6c5b")
    logger.warning("config", extra={"dsn": "clickhouse://u:s3cr3t-pw@h/db"})
    logger.warning("headers: Authorization: Bearer tok-9f8e7d6c5b")
    try:
        raise ConnectionError("sasl.password='s3cr3t-pw' refused")
    except ConnectionError:
        logger.exception("broker login failed")
    text = stream.getvalue()
    for secret in SECRETS:
        assert secret not in text, (secret, text)
    # What is not a secret survives, so the line still helps.
    assert "ch.internal:8123/db" in text and "admin:***@" in text
    assert "broker login failed" in text and "ConnectionError" in text


def test_redact_leaves_usage_words_alone() -> None:
    for harmless in ("meter=llm_tokens quantity=1200", "tokens=5", "partition 3 offset 12",
                     "http://ch.internal:8123/db"):
        assert redact(harmless) == harmless


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        logging_config("xml", logging.INFO)


def _meterline(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterline.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_cli_json_logs_are_json_lines(tmp_path: Path) -> None:
    out = _meterline("-v", "--log-format", "json", "migrate",
                     env={"METERLINE_DATA_DIR": str(tmp_path / "chdb")})
    assert out.returncode == 0, out.stderr
    lines = [orjson.loads(line) for line in out.stderr.splitlines()]
    applied = [x for x in lines if x["logger"] == "meterline.migrate"]
    assert applied and all(str(x["message"]).startswith("applied: CREATE") for x in applied)
    assert "statements applied" in out.stdout


def test_cli_error_is_one_line_without_the_password(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    out = _meterline("--log-format", "json", "migrate",
                     env={"METERLINE_CLICKHOUSE_URL": "http://admin:hunter2secret@127.0.0.1:9/m"})
    assert out.returncode == 2, out.stderr
    assert "hunter2secret" not in out.stderr + out.stdout
    assert "error: cannot connect to ClickHouse" in out.stderr
    assert "Traceback" not in out.stderr
