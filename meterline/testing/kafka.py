"""A real, single-node Apache Kafka broker for integration tests and benchmarks.

Pinned version: **Apache Kafka 3.9.1** (``kafka_2.13``, Scala 2.13), KRaft mode with one
process acting as both broker and controller (``process.roles=broker,controller``).
The jars come from Maven Central through ``tools/kafka/pom.xml`` and
``tools/kafka/fetch.sh`` (cached in ``.cache/kafka/<version>/libs`` or
``$METERLINE_KAFKA_HOME/libs``); ``KAFKA_VERSION`` below must match ``<kafka.version>``
in that pom (a test checks it).

The broker listens on 127.0.0.1 only, keeps its data under ``data_dir`` (so ``restart()``
and a new ``KafkaBroker`` on the same directory keep topics and records) and logs at
WARN to ``log_file``. The JVM runs in its own process group; every broker still running
when the interpreter exits is killed by an ``atexit`` hook, and on Linux the JVM also
gets SIGKILL if the thread that started it dies (``PR_SET_PDEATHSIG``; only set when
started from the main thread, since that signal follows the *thread*, not the process).

Usage::

    with KafkaBroker(tmp_path / "kafka") as broker:
        broker.create_topic("usage", partitions=4)
        Producer({"bootstrap.servers": broker.bootstrap})

CLI::

    python -m meterline.testing.kafka run --data-dir DIR [--port N] [--partitions N]
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

KAFKA_VERSION = "3.9.1"

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = _REPO_ROOT / "tools" / "kafka" / "fetch.sh"
_NODE_ID = 1
_HOST = "127.0.0.1"

# JVM flags: a modest heap, no hsperfdata files, headless. Tiered compilation is left on
# (TieredStopAtLevel=1 starts a JVM faster but would slow the broker under benchmark load).
JVM_OPTS: tuple[str, ...] = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:-UsePerfData",
    "-Xshare:auto",
    "-Djava.awt.headless=true",
)

_LOG4J_PROPERTIES = """\
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
# State-change and request logs are chatty even at INFO; keep them quiet.
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.request.logger=WARN
"""

# Every JVM this module started and has not yet seen exit: killed at interpreter exit.
_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


class KafkaBrokerError(RuntimeError):
    """The broker could not be fetched, formatted, started or reached."""


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@atexit.register
def _kill_all_at_exit() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
        _LIVE.clear()
    for proc in procs:
        if proc.poll() is None:
            _kill_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when its parent thread dies.

    prctl is looked up here, in the parent: the child of a multi-threaded process
    (librdkafka runs threads) must not dlopen between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    return preexec


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held together while picked)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((_HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def kafka_home() -> Path:
    """Where the jars live: ``$METERLINE_KAFKA_HOME`` or ``<repo>/.cache/kafka/<version>``."""
    override = os.environ.get("METERLINE_KAFKA_HOME")
    return Path(override) if override else _REPO_ROOT / ".cache" / "kafka" / KAFKA_VERSION


def ensure_kafka_libs(timeout_s: float = 900) -> Path:
    """Return the directory of Kafka's jars, running ``tools/kafka/fetch.sh`` if needed."""
    home = kafka_home()
    libs = home / "libs"
    if (home / ".fetched").is_file() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    if not FETCH_SCRIPT.is_file():
        raise KafkaBrokerError(
            f"no Kafka jars in {libs} and no {FETCH_SCRIPT} to fetch them "
            "(set METERLINE_KAFKA_HOME to a directory whose libs/ holds them)"
        )
    log.info("fetching Kafka %s jars with %s", KAFKA_VERSION, FETCH_SCRIPT)
    try:
        out = subprocess.run(
            ["bash", str(FETCH_SCRIPT)],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.CalledProcessError as exc:
        raise KafkaBrokerError(f"{FETCH_SCRIPT} failed:\n{exc.stderr}") from exc
    except subprocess.TimeoutExpired as exc:
        raise KafkaBrokerError(f"{FETCH_SCRIPT} took over {timeout_s:.0f}s") from exc
    lines = out.stdout.strip().splitlines()
    fetched = Path(lines[-1]) if lines else libs
    if not any(fetched.glob("kafka_2.13-*.jar")):
        raise KafkaBrokerError(f"{FETCH_SCRIPT} ran but left no kafka jar in {fetched}")
    return fetched


def _tail(path: Path | None, lines: int = 60) -> str:
    if path is None or not path.exists():
        return "(no log)"
    with path.open("r", errors="replace") as fh:
        return "".join(deque(fh, maxlen=lines))


def _new_cluster_id() -> str:
    # Kafka's Uuid.toString: URL-safe base64 of 16 bytes without padding (22 chars).
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


class KafkaBroker:
    """One Kafka JVM (broker + KRaft controller) on 127.0.0.1, data kept in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        partitions: int = 4,
        log_file: Path | None = None,
        extra_config: Mapping[str, str] | None = None,
        log_level: str = "WARN",
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.controller_port: int | None = None
        self.partitions = partitions
        self.extra_config = dict(extra_config or {})  # server.properties overrides
        self.log_level = log_level  # log4j level of the broker's own log
        self.log_file = Path(log_file).resolve() if log_file else self.data_dir / "broker.log"
        self.logs_dir = self.data_dir / "kafka-logs"
        self.config_file = self.data_dir / "server.properties"
        self.log4j_file = self.data_dir / "log4j.properties"
        self.start_seconds: float | None = None  # wall time of the last start()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._admin: Any = None

    # ------------------------------------------------------------------ properties
    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise KafkaBrokerError("broker has no port yet: call start() first")
        return f"{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 60) -> KafkaBroker:
        """Start the JVM (formatting storage on first use) and wait until it serves metadata.

        Fetching the jars on a cold cache is not counted in ``timeout_s``.
        """
        if self.is_running():
            return self
        self._reap()  # a JVM that exited by itself
        libs = ensure_kafka_libs()
        t0 = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if self.port is None or self.controller_port is None:
            # Picked once: restart() reuses both ports so clients reconnect to the same address.
            picked = [p for p in free_ports(3) if p != self.port]
            if self.port is None:
                self.port = picked.pop(0)
            self.controller_port = picked[0]
        self._write_config()
        classpath = f"{libs}{os.sep}*"
        if not (self.logs_dir / "meta.properties").exists():
            self._format_storage(classpath, timeout_s)
        self._spawn(classpath)
        try:
            self._wait_ready(t0 + timeout_s)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - t0
        log.info("kafka %s up at %s in %.1fs", KAFKA_VERSION, self.bootstrap, self.start_seconds)
        return self

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (clean shutdown: flushes logs), then SIGKILL after ``timeout_s``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("kafka pid %d ignored SIGTERM for %.0fs; killing", proc.pid, timeout_s)
                _kill_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        self._reap()

    def kill(self) -> None:
        """SIGKILL right away (a crash: unflushed data may be lost, restart recovers)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _kill_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
        self._reap()

    def restart(self, timeout_s: float = 60) -> KafkaBroker:
        """Stop and start again on the same ports and data, so clients reconnect."""
        self.stop()
        return self.start(timeout_s=timeout_s)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ admin
    def admin(self) -> Any:
        """A confluent_kafka AdminClient for this broker (one, reused)."""
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient(
                {"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 5000},
                logger=logging.getLogger(f"{__name__}.admin"),
            )
        return self._admin

    def create_topic(self, name: str, partitions: int | None = None, timeout_s: float = 30,
                     config: dict[str, str] | None = None) -> str:
        """Create ``name`` (replication 1) and wait until every partition has a leader."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import NewTopic

        n = partitions if partitions is not None else self.partitions
        deadline = time.monotonic() + timeout_s
        futures = self.admin().create_topics(
            [NewTopic(name, num_partitions=n, replication_factor=1, config=config or {})],
            operation_timeout=timeout_s,
            request_timeout=timeout_s,
        )
        try:
            futures[name].result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        while True:
            md = self.admin().list_topics(topic=name, timeout=5)
            topic = md.topics.get(name)
            if (
                topic is not None
                and topic.error is None
                and len(topic.partitions) == n
                and all(p.leader >= 0 for p in topic.partitions.values())
            ):
                return name
            if time.monotonic() > deadline:
                raise KafkaBrokerError(f"topic {name!r} has no leaders after {timeout_s}s")
            time.sleep(0.05)

    # ------------------------------------------------------------------ internals
    def _write_config(self) -> None:
        props = {
            "process.roles": "broker,controller",
            "node.id": str(_NODE_ID),
            "controller.quorum.voters": f"{_NODE_ID}@{_HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{_HOST}:{self.port},CONTROLLER://{_HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{_HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.logs_dir),
            "num.partitions": str(self.partitions),
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            # 50 partitions by default: creating them costs seconds on the first group join.
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "8",
            "group.initial.rebalance.delay.ms": "0",
            # After a kill the controller refuses the new broker incarnation until the old
            # session expires (DUPLICATE_BROKER_REGISTRATION): 9 s by default, ~14 s to
            # come back with registration backoff. 4 s keeps kill -> start near 6 s while
            # leaving a wide margin for heartbeats on a busy 2-core machine.
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "500",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            "num.network.threads": "3",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "2",
            "log.retention.hours": "24",
            "log.segment.bytes": str(256 * 1024 * 1024),
        }
        props.update(self.extra_config)
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        self.config_file.write_text(text)
        self.log4j_file.write_text(_LOG4J_PROPERTIES.replace("WARN", self.log_level, 1))

    def _java(self, classpath: str, main: str, *args: str, short_lived: bool = False) -> list[str]:
        java = os.environ.get("JAVA_HOME")
        exe = str(Path(java) / "bin" / "java") if java else "java"
        # C1 only for one-shot tools: starts faster, and they never get hot.
        extra = ["-XX:TieredStopAtLevel=1"] if short_lived else []
        return [
            exe,
            *JVM_OPTS,
            *extra,
            f"-Dlog4j.configuration=file:{self.log4j_file}",
            f"-Dkafka.logs.dir={self.data_dir / 'jvm-logs'}",
            "-cp",
            classpath,
            main,
            *args,
        ]

    def _format_storage(self, classpath: str, timeout_s: float) -> None:
        cmd = self._java(
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            # One argument: an id starting with '-' would otherwise parse as an option.
            f"--cluster-id={_new_cluster_id()}",
            "--config",
            str(self.config_file),
            short_lived=True,
        )
        with self.log_file.open("ab") as fh:
            fh.write(b"--- kafka.tools.StorageTool format ---\n")
            fh.flush()
            try:
                rc = subprocess.run(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s
                ).returncode
            except subprocess.TimeoutExpired as exc:
                raise KafkaBrokerError(f"storage format took over {timeout_s}s") from exc
        if rc != 0 or not (self.logs_dir / "meta.properties").exists():
            raise KafkaBrokerError(
                f"kafka.tools.StorageTool format failed (rc={rc}):\n{_tail(self.log_file)}"
            )

    def _spawn(self, classpath: str) -> None:
        cmd = self._java(classpath, "kafka.Kafka", str(self.config_file))
        self._log_fh = self.log_file.open("ab")
        self._log_fh.write(f"--- kafka.Kafka on {self.bootstrap} ---\n".encode())
        self._log_fh.flush()
        on_main = threading.current_thread() is threading.main_thread()
        preexec = _pdeathsig_preexec() if on_main else None
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,  # own process group: signals reach the whole JVM tree
            preexec_fn=preexec,
        )
        with _LIVE_LOCK:
            _LIVE.add(self._proc)

    def _wait_ready(self, deadline: float) -> None:
        # Cheap TCP probes first: the admin client would log a refused connection per try.
        assert self._proc is not None and self.port is not None
        while not self._port_open():
            self._check_alive()
            if time.monotonic() > deadline:
                self._fail("did not open its port")
            time.sleep(0.1)
        while True:
            self._check_alive()
            try:
                md = self.admin().list_topics(timeout=2)
                if _NODE_ID in md.brokers:
                    return
            except Exception as exc:  # KafkaException while the broker is still catching up
                log.debug("metadata not ready yet: %s", exc)
            if time.monotonic() > deadline:
                self._fail("did not answer a metadata request")
            time.sleep(0.1)

    def _port_open(self) -> bool:
        assert self.port is not None
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex((_HOST, self.port)) == 0

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            rc = self._proc.returncode
            self._reap()
            raise KafkaBrokerError(f"kafka exited with code {rc}:\n{_tail(self.log_file)}")

    def _fail(self, what: str) -> None:
        raise KafkaBrokerError(
            f"kafka on {self.bootstrap} {what} in time; log {self.log_file}:\n"
            f"{_tail(self.log_file)}"
        )

    def _reap(self) -> None:
        if self._proc is not None:
            with _LIVE_LOCK:
                _LIVE.discard(self._proc)
            self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"KafkaBroker({self.data_dir}, port={self.port}, {state})"


# ---------------------------------------------------------------------- CLI
def _run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    broker = KafkaBroker(Path(args.data_dir), port=args.port, partitions=args.partitions)
    try:
        broker.start(timeout_s=args.timeout)
        print(broker.bootstrap, flush=True)
        print(
            f"kafka {KAFKA_VERSION} pid {broker.pid} started in {broker.start_seconds:.1f}s; "
            f"log {broker.log_file}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0):
            if not broker.is_running():
                print(f"kafka exited:\n{_tail(broker.log_file)}", file=sys.stderr)
                return 1
        return 0
    finally:
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meterline.testing.kafka")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a broker and keep it up until Ctrl-C / SIGTERM")
    run.add_argument("--data-dir", required=True, help="broker data (kept between runs)")
    run.add_argument("--port", type=int, default=None, help="PLAINTEXT port (default: free)")
    run.add_argument("--partitions", type=int, default=4, help="num.partitions default")
    run.add_argument("--timeout", type=float, default=60, help="start timeout, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "KafkaBrokerError",
    "ensure_kafka_libs",
    "free_ports",
    "kafka_home",
]
