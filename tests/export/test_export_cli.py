"""`meterline export` as a user runs it (subprocesses on a seeded chDB), including kill -9
in the middle of a webhook export: every item reaches the receiver exactly once by key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from export_factories import SECRET

from meterline.core.billing.periods import parse_instant
from meterline.export.ledger import ExportLedger
from meterline.export.receiver import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
N = 300  # final lines of 2026-11 seeded (plus a correction, an in-progress line, a December one)
API_KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dcSECRET"  # noqa: S105 - must never be printed
NOV = parse_instant("2026-11-01")
LINE = f"{NOV}/usage/api_calls:count"
# The truth, from what was seeded (not from the exporter): N lines + the correction of line 0.
def expected(n: int) -> set[str]:
    return {f"ml1:sub-{i:05d}:{NOV}:{LINE}:0" for i in range(n)} | {
        f"ml1:sub-00000:{NOV}:{LINE}:1"}


EXPECTED = expected(N)
# The Chargebee client builds an HTTP client with a fresh TLS context for every request
# (~0.1 s of CPU here), so its kill -9 case runs on fewer lines.
N_SMALL = 60


def _seed(tmp_path_factory: pytest.TempPathFactory, n: int) -> Path:
    path = tmp_path_factory.mktemp("export-chdb") / "chdb"
    out = subprocess.run([sys.executable, str(HERE / "seed_lines.py"), str(path), str(n)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield _seed(tmp_path_factory, N)


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield _seed(tmp_path_factory, N_SMALL)


def _env(data_dir: Path, ledger: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("METERLINE_", "STRIPE_", "CHARGEBEE_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    return {**env, "METERLINE_DATA_DIR": str(data_dir), "METERLINE_EXPORT_LEDGER": str(ledger),
            "METERLINE_WEBHOOK_SECRET": SECRET, "STRIPE_API_KEY": API_KEY, **extra}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meterline.cli", *args]


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cli(*args), capture_output=True, text=True, timeout=180, env=env)


def test_settings_errors_are_reported_together(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    out = subprocess.run(_cli("export", "--target", "webhook", "--concurrency", "0",
                              "--ledger", str(tmp_path / "l.db")),
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stderr
    for text in ("--period is required", "concurrency must be an int >= 1",
                 "webhook url must be an http(s) URL", "webhook secret must be at least 16"):
        assert text in out.stderr
    assert "meterline export has 4 error(s)" in out.stderr


def test_files_export_twice_writes_identical_files(data_dir: Path, tmp_path: Path) -> None:
    env = _env(data_dir, tmp_path / "ledger.db")
    first = _run(env, "export", "--target", "files", "--period", "2026-11", "--out",
                 str(tmp_path / "out"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{N + 1} item(s), {N + 1} new" in first.stdout
    files = sorted((tmp_path / "out" / "2026-11").iterdir())
    before = {p.name: p.read_bytes() for p in files}
    # Remove the ledger: a fresh export from scratch must produce the same bytes.
    for p in tmp_path.glob("ledger.db*"):
        p.unlink()
    second = _run(env, "export", "--target", "files", "--period", "2026-11", "--out",
                  str(tmp_path / "out"))
    assert second.returncode == 0, second.stderr
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "out" / "2026-11").iterdir())
            } == before
    csv_keys = {row.split(",")[0] for row in before["rated-lines-2026-11.csv"].decode()
                .splitlines()[1:]}
    assert csv_keys == EXPECTED
    # Reconcile's last hop: rated vs ledger vs the files; then a file edited behind our back.
    ok = _run(env, "reconcile", "--period", "2026-11", "--target", "files", "--out",
              str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{N + 1} final rated line(s), {N + 1} in the ledger ({N + 1} sent), {N + 1} held " \
        "by the target" in ok.stdout
    csv_path = tmp_path / "out" / "2026-11" / "rated-lines-2026-11.csv"
    csv_path.write_bytes(csv_path.read_bytes().replace(b",-0.25,", b",-0.24,"))
    bad = _run(env, "reconcile", "--period", "2026-11", "--target", "files", "--out",
               str(tmp_path / "out"))
    assert bad.returncode == 1
    assert f"{N + 1} difference(s)" in bad.stdout and "NOT HELD" in bad.stdout


def _webhook_case(tmp_path: Path, request: pytest.FixtureRequest
                  ) -> tuple[Any, list[str], dict[str, str]]:
    def respond(n: int, key: str) -> int | None:
        time.sleep(0.01)  # a receiver doing some work: the export takes a while
        return None

    rx = WebhookReceiver(SECRET, respond=respond).start()
    return rx, ["--target", "webhook", "--url", rx.url], {}


class _StripeHolds:
    """What stripe-mock (behind the recording proxy: Stripe's idempotent replay) holds."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    @property
    def held(self) -> set[str]:
        return set(self.proxy.accepted_count_by_key())

    @property
    def deliveries(self) -> Counter[str]:  # on the wire, replays included
        return Counter(r.idempotency_key for r in self.proxy.records()
                       if r.path.startswith("/v1/"))

    def held_once(self) -> bool:
        return set(self.proxy.accepted_count_by_key().values()) == {1}

    def stop(self) -> None:
        self.proxy.stop()


def _stripe_case(tmp_path: Path, request: pytest.FixtureRequest
                 ) -> tuple[Any, list[str], dict[str, str]]:
    from meterline.testing.stripe_mock import RecordingProxy

    server = request.getfixturevalue("stripe_server")
    proxy = RecordingProxy(server.url).start()
    config = tmp_path / "targets.toml"
    # Every seeded customer mapped to a Stripe customer; no meter mapped: invoice items.
    config.write_text("[stripe.customers]\n" + "".join(
        f'"cust-{i:05d}" = "cus_M{i:05d}"\n' for i in range(N + 2)))
    return (_StripeHolds(proxy), ["--target", "stripe", "--target-config", str(config)],
            {"STRIPE_API_BASE": proxy.url})


class _ChargebeeHolds:
    """What the Chargebee peer holds: usage records, each naming its key in the note."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer

    @property
    def held(self) -> set[str]:
        return {u["note"].split()[1] for u in self.peer.usages().values()}

    @property
    def deliveries(self) -> Counter[str]:  # creates on the wire, refused repeats included
        return Counter(r.form["note"].split()[1] for r in self.peer.requests()
                       if r.method == "POST")

    def stop(self) -> None:
        self.peer.stop()


CB_SITE, CB_KEY = "acme-test", "test_cbKillNineDoNotLeak_51f0"  # noqa: S105


def _chargebee_case(tmp_path: Path, request: pytest.FixtureRequest
                    ) -> tuple[Any, list[str], dict[str, str]]:
    from meterline.testing.chargebee_peer import ChargebeePeer

    peer = ChargebeePeer(CB_SITE, CB_KEY).start()
    for i in range(N_SMALL + 2):  # Meterline's subscription ids are Chargebee's (unmapped)
        peer.add_subscription(f"sub-{i:05d}", {"api-calls-usd"})
    config = tmp_path / "targets.toml"
    config.write_text('[chargebee.item_prices]\n"api_calls:count" = "api-calls-usd"\n')
    # CHARGEBEE_API_BASE: the CLI's client talks to the peer on loopback, no monkeypatch.
    return (_ChargebeeHolds(peer), ["--target", "chargebee", "--target-config", str(config)],
            {"CHARGEBEE_API_KEY": CB_KEY, "CHARGEBEE_SITE": CB_SITE,
             "CHARGEBEE_API_BASE": peer.url})


@pytest.fixture(scope="module")
def stripe_server() -> Iterator[Any]:
    from meterline.testing.stripe_mock import stripe_mock_or_skip

    with stripe_mock_or_skip() as server:
        yield server


# Targets the kill -9 test runs against: each case starts what receives and returns an
# object with .held (keys held, once each) and .deliveries (Counter of keys on the wire),
# the CLI arguments and extra environment.
KILL_CASES = {"webhook": _webhook_case, "stripe": _stripe_case,
              "chargebee": _chargebee_case}
KILL_LINES = {"chargebee": N_SMALL}  # seeded final lines per case (default N)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(KILL_CASES))
def test_kill_9_mid_export_then_restart_delivers_every_item_once(
        case: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    n = KILL_LINES.get(case, N)
    data_dir = request.getfixturevalue("data_dir" if n == N else "small_data_dir")
    want = expected(n)
    ledger_path = tmp_path / "ledger.db"
    rx, target_args, extra_env = KILL_CASES[case](tmp_path, request)
    env = _env(data_dir, ledger_path, **extra_env)
    try:
        args = ["export", *target_args, "--period", "2026-11", "--batch-size", "10",
                "--concurrency", "4"]
        proc = subprocess.Popen(_cli(*args), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # Kill when the receiver holds some but not all items: progress, not wall time.
        while proc.poll() is None and len(rx.held) < n // 3:
            time.sleep(0.002)
        assert proc.poll() is None, "the export finished before the kill point: " + \
            "".join(proc.communicate())
        proc.send_signal(signal.SIGKILL)
        killed_output = "".join(proc.communicate())
        held_at_kill = set(rx.held)
        assert 0 < len(held_at_kill) < len(want)
        ledger = ExportLedger(ledger_path)
        states = {e.key: e.state for e in ledger.entries(case)}
        ledger.close()
        in_flight = {k for k, s in states.items() if s == "sending"}
        assert set(states) == want  # everything was enqueued before sending began
        # Whatever the ledger calls sent, the receiver holds (the protocol's invariant).
        assert {k for k, s in states.items() if s == "sent"} <= held_at_kill

        again = _run(env, *args)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"{n + 1} already in the ledger" in again.stdout
        if in_flight:
            assert f"re-sent after a crash {len(in_flight)}" in again.stdout
        assert set(rx.held) == want  # none skipped, held once by key
        if isinstance(rx, _StripeHolds):
            assert rx.held_once()  # stripe-mock accepted each key once (replays not forwarded)
        twice = {k for k, n in rx.deliveries.items() if n > 1}
        assert twice <= in_flight  # only items caught mid-call went on the wire again
        assert max(rx.deliveries.values()) <= 2
        ledger = ExportLedger(ledger_path)
        assert ledger.counts(case) == {"pending": 0, "sending": 0, "sent": n + 1, "failed": 0}
        ledger.close()
        stored = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
        for secret in (SECRET, API_KEY, CB_KEY):  # every target's key
            assert secret not in killed_output + again.stdout + again.stderr
            assert secret.encode() not in stored
    finally:
        rx.stop()


def test_refusals_status_replay_and_no_secret_anywhere(data_dir: Path, tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.db"
    env = _env(data_dir, ledger_path)
    refuse = {f"ml1:sub-{i:05d}:{NOV}:{LINE}:0" for i in (3, 5)}
    flaky = f"ml1:sub-{7:05d}:{NOV}:{LINE}:0"
    mode = {"on": True}

    def respond(n: int, key: str) -> int | None:
        if not mode["on"]:
            return None
        return 422 if key in refuse else 503 if key == flaky else None

    logs = ""
    with WebhookReceiver(SECRET, respond=respond) as rx:
        base = ["export", "--target", "webhook", "--url", rx.url, "--period", "2026-11"]
        first = _run(env, "-v", "--log-format", "json", *base, "--until-drained",
                     "--max-attempts", "2", "--backoff-base", "0.01")
        logs += first.stdout + first.stderr
        assert first.returncode == 1
        assert "failed 3" in first.stdout and f"FAILED {flaky}" in first.stdout
        assert "refused" in first.stderr  # the log lines being grepped exist
        status = _run(env, "export", "--target", "webhook", "--status")
        logs += status.stdout + status.stderr
        assert status.returncode == 1
        assert f"{N - 2} sent, 3 failed" in status.stdout
        assert "rejected: http 422" in status.stdout
        assert f"FAILED {flaky} after 2 attempt(s): gave up after 2 attempt(s): http 503" \
            in status.stdout
        mode["on"] = False
        replay = _run(env, "-v", *base, "--replay")
        logs += replay.stdout + replay.stderr
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "3 dead letter(s) re-queued" in replay.stdout
    assert set(rx.held) == EXPECTED
    assert rx.bad_signatures == 0 and rx.seen_headers[0]["X-Meterline-Signature"]
    # The secret signed every request, yet appears in no output, log line or ledger byte.
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
    assert len(stored) > 10_000
    for secret in (SECRET, API_KEY):
        assert secret not in logs
        assert secret.encode() not in stored


def test_items_past_the_idempotency_window_need_the_explicit_replay(tmp_path: Path) -> None:
    """A ledger whose items were first attempted 25 h ago against a target that keeps keys
    24 h: --status says so, --replay leaves them, --replay-past-window sends them."""
    from export_factories import rated_line

    from meterline.export.build import item_from_line
    from meterline.export.items import SendResult

    ledger_path = tmp_path / "ledger.db"
    items = [item_from_line(rated_line(i)) for i in range(3)]
    now_ms = time.time_ns() // 1_000_000
    first_ms = now_ms - 25 * 3_600_000
    ledger = ExportLedger(ledger_path)
    ledger.enqueue("webhook", items, first_ms)
    claimed = ledger.claim("webhook", first_ms, 2)
    ledger.apply("webhook", [SendResult(it.key, "retry", None, "unreachable: timeout")
                             for it in claimed], first_ms)
    held = ledger.claim_within("webhook", now_ms, 0, 24 * 3_600_000).held
    assert held == sorted(it.key for it in claimed)
    ledger.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env = {**env, "METERLINE_EXPORT_LEDGER": str(ledger_path),
           "METERLINE_WEBHOOK_SECRET": SECRET}
    with WebhookReceiver(SECRET) as rx:
        status = _run(env, "export", "--target", "webhook", "--status")
        assert status.returncode == 1
        assert "2 failed item(s) are past the target's idempotency window" in status.stdout
        for key in held:
            assert f"FAILED {key} after 1 attempt(s): idempotency window passed: check " \
                f"webhook for {key} before replaying" in status.stdout
        plain = _run(env, "export", "--target", "webhook", "--url", rx.url, "--replay")
        assert "replay: 0 dead letter(s) re-queued" in plain.stdout, plain.stdout + plain.stderr
        assert "2 item(s) past the target's idempotency window not re-queued" in plain.stdout
        assert set(rx.held) == {items[2].key}  # only the never-attempted item went out
        explicit = _run(env, "export", "--target", "webhook", "--url", rx.url,
                        "--replay-past-window")
        assert explicit.returncode == 0, explicit.stdout + explicit.stderr
        assert "replay: 2 dead letter(s) re-queued" in explicit.stdout
    assert set(rx.held) == {it.key for it in items}
    assert set(rx.deliveries.values()) == {1}
