"""``meterline export``: rated lines of a month -> a target, through the ledger.

    meterline export --target files --period 2026-11 --out exports/
    METERLINE_WEBHOOK_SECRET=... meterline export --target webhook --url https://erp/hook \\
        --period 2026-11 --until-drained
    meterline export --target webhook --status            # ledger states, dead letters
    meterline export --target webhook --replay            # dead letters -> pending

``meterline.cli`` adds the parser and hands the command here. Settings come from the
options and the environment (secrets only from the environment: an option would show in
``ps`` and shell history) and are validated together, every problem reported at once,
before anything is read or sent. Exit codes: 0 everything due was sent; 1 items failed,
conflicted or are still pending; 2 bad settings.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterline.core.errors import ConfigError

__all__ = ["COMMANDS", "ExportSettings", "add_parsers", "default_ledger_path", "run"]

COMMANDS = ("export",)
TARGETS = ("files", "webhook", "stripe", "chargebee")
# Optional targets built beside this module: (module, class, required environment).
PLUGIN_TARGETS = {
    "stripe": ("meterline.export.stripe_target", "StripeTarget", ("STRIPE_API_KEY",)),
    "chargebee": ("meterline.export.chargebee_target", "ChargebeeTarget",
                  ("CHARGEBEE_API_KEY", "CHARGEBEE_SITE")),
}


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("export", help="push a month's rated lines to files, a signed webhook, "
                       "Stripe or Chargebee, exactly once per line (docs/export.md)")
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument("--period", default=None, help="month, e.g. 2026-11 (periods starting in "
                   "it); required unless --status or --replay")
    p.add_argument("--out", type=Path, default=None,
                   help="files: output directory (default: export-files beside the ledger)")
    p.add_argument("--url", default=None, help="webhook: receiver URL "
                   "(default: $METERLINE_WEBHOOK_URL); the secret is $METERLINE_WEBHOOK_SECRET")
    p.add_argument("--status", action="store_true", help="show the ledger, send nothing")
    p.add_argument("--replay", action="store_true",
                   help="re-queue dead letters (failed items), then send")
    p.add_argument("--replay-past-window", action="store_true",
                   help="--replay, and also items held because the target's idempotency "
                        "window passed (Stripe: 24 h) -- only after checking the target "
                        "does not hold them: a resend is not recognised by key any more")
    p.add_argument("--until-drained", action="store_true",
                   help="wait out retry backoffs until every item is sent or failed")
    p.add_argument("--include-in-progress", action="store_true",
                   help="also lines of periods not final yet (a later change of such a line "
                        "shows as a conflict)")
    p.add_argument("--ledger", type=Path, default=None,
                   help="export ledger (default: $METERLINE_EXPORT_LEDGER, else "
                        "export-ledger.db beside the chDB data dir)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-attempts", type=int, default=8)
    p.add_argument("--backoff-base", type=float, default=1.0, metavar="SECONDS")
    p.add_argument("--backoff-max", type=float, default=300.0, metavar="SECONDS")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="per request (webhook)")
    p.add_argument("--lines-per-request", type=int, default=1, help="webhook lines per POST")
    p.add_argument("--pipeline", type=int, default=1, metavar="N",
                   help="webhook: HTTP/1.1 requests pipelined per connection (1: none; the "
                        "receiver must answer pipelined requests, as HTTP/1.1 requires)")
    p.add_argument("--target-config", type=Path, default=None,
                   help="TOML with a [stripe] or [chargebee] table: customer/subscription "
                        "maps, meters (default: $METERLINE_EXPORT_TARGET_CONFIG); keys come "
                        "from the environment only")


def default_ledger_path(config: Any, env: Mapping[str, str]) -> Path:
    if env.get("METERLINE_EXPORT_LEDGER"):
        return Path(env["METERLINE_EXPORT_LEDGER"])
    data_dir = getattr(config.storage, "data_dir", None) if config is not None else None
    if data_dir and not getattr(config.storage, "url", None):
        return Path(data_dir).resolve().parent / "export-ledger.db"
    return Path("var") / "export-ledger.db"


@dataclass(frozen=True)
class ExportSettings:
    target: str
    period: str | None
    ledger: Path
    out: Path
    url: str
    secret: str
    include_in_progress: bool
    batch_size: int
    concurrency: int
    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    timeout_s: float
    lines_per_request: int
    target_config: Path | None = None
    pipeline: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace, config: Any,
                  env: Mapping[str, str]) -> ExportSettings:
        """Every problem at once (ConfigError), or settings that will not fail later."""
        from meterline.export.webhook_target import WebhookTargetSettings
        from meterline.rating.stage import month_range

        errors: list[str] = []
        if getattr(args, "replay_past_window", False):
            args.replay = True
        if args.period is None and not (args.status or args.replay):
            errors.append("--period is required (a month such as 2026-11)")
        if args.period is not None:
            try:
                month_range(args.period)
            except ValueError as exc:
                errors.append(str(exc))
        ledger = args.ledger or default_ledger_path(config, env)
        settings = cls(
            target=args.target, period=args.period, ledger=ledger,
            out=args.out or ledger.parent / "export-files",
            url=args.url or env.get("METERLINE_WEBHOOK_URL", ""),
            secret=env.get("METERLINE_WEBHOOK_SECRET", ""),
            include_in_progress=args.include_in_progress, batch_size=args.batch_size,
            concurrency=args.concurrency, max_attempts=args.max_attempts,
            backoff_base_s=args.backoff_base, backoff_max_s=args.backoff_max,
            timeout_s=args.timeout, lines_per_request=args.lines_per_request,
            target_config=getattr(args, "target_config", None)
            or (Path(env["METERLINE_EXPORT_TARGET_CONFIG"])
                if env.get("METERLINE_EXPORT_TARGET_CONFIG") else None),
            pipeline=getattr(args, "pipeline", 1))
        errors += settings.engine().errors() + settings.policy().errors()
        if args.target == "webhook" and not args.status:
            errors += WebhookTargetSettings(settings.url, settings.secret, settings.timeout_s,
                                            settings.lines_per_request,
                                            settings.pipeline).errors()
        if args.target in PLUGIN_TARGETS and not args.status:
            errors += [f"{name} must be set for --target {args.target}"
                       for name in PLUGIN_TARGETS[args.target][2] if not env.get(name)]
        if errors:
            raise ConfigError(errors, "meterline export")
        return settings

    def engine(self) -> Any:
        from meterline.export.engine import EngineSettings

        return EngineSettings(self.batch_size, self.concurrency)

    def policy(self) -> Any:
        from meterline.export.ledger import RetryPolicy

        return RetryPolicy(self.max_attempts, self.backoff_base_s, self.backoff_max_s)

    def __repr__(self) -> str:  # never the secret
        return f"ExportSettings(target={self.target!r}, period={self.period!r}, secret='***')"


def build_target(settings: ExportSettings, env: Mapping[str, str]) -> Any:
    if settings.target == "files":
        from meterline.export.files_target import FilesTarget

        return FilesTarget(settings.out)
    if settings.target == "webhook":
        from meterline.export.webhook_target import WebhookTarget, WebhookTargetSettings

        return WebhookTarget(WebhookTargetSettings(settings.url, settings.secret,
                                                   settings.timeout_s,
                                                   settings.lines_per_request,
                                                   settings.pipeline))
    return _plugin_target(settings, env)


def _plugin_target(settings: ExportSettings, env: Mapping[str, str]) -> Any:
    """Stripe or Chargebee, built lazily (their SDKs are imported only here): keys from the
    environment, the rest (customer/subscription maps, meters, concurrency) from the
    ``[stripe]`` / ``[chargebee]`` table of ``--target-config``; ``STRIPE_API_BASE`` points
    the Stripe client elsewhere (stripe-mock), ``CHARGEBEE_API_BASE`` the Chargebee client (a
    private gateway, or the local test peer on http://127.0.0.1)."""
    import dataclasses
    import tomllib

    module_name, class_name, _ = PLUGIN_TARGETS[settings.target]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise ConfigError([f"--target {settings.target} needs {exc.name} "
                               f"(pip install 'meterline[server]')"], "meterline export"
                              ) from None
        raise ConfigError([f"--target {settings.target}: {module_name} is not available in "
                           "this build"], "meterline export") from None
    table: dict[str, Any] = {}
    if settings.target_config is not None:
        try:
            with open(settings.target_config, "rb") as f:
                table = dict(tomllib.load(f).get(settings.target, {}))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"--target-config {settings.target_config}: {exc}"],
                              "meterline export") from None
    config_cls = getattr(module, class_name.replace("Target", "Config"))
    known = {f.name for f in dataclasses.fields(config_cls)} - {"api_key", "site"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError([f"[{settings.target}] {k}: unknown setting (known: "
                           f"{', '.join(sorted(known))})" for k in unknown], "meterline export")
    if settings.target == "stripe":
        if env.get("STRIPE_API_BASE"):
            table["api_base"] = env["STRIPE_API_BASE"]
        kwargs = {"api_key": env.get("STRIPE_API_KEY", ""), **table}
    else:
        if env.get("CHARGEBEE_API_BASE"):
            table["api_base"] = env["CHARGEBEE_API_BASE"]
        kwargs = {"site": env.get("CHARGEBEE_SITE", ""),
                  "api_key": env.get("CHARGEBEE_API_KEY", ""), **table}
    try:
        config = config_cls(**kwargs)
        return getattr(module, class_name)(config)
    except ValueError as exc:  # the targets' config errors carry every problem, no secret
        errors = getattr(exc, "errors", None) or [str(exc)]
        raise ConfigError(list(errors), f"meterline export --target {settings.target}"
                          ) from None


def _period_items(settings: ExportSettings, config: Any) -> list[Any]:
    from meterline.export.build import items_from_lines
    from meterline.rating.stage import month_range
    from meterline.sinks.rated_usage import CurrentLinesQuery
    from meterline.sinks.storage import open_storage

    assert settings.period is not None
    start, end = month_range(settings.period)
    storage = open_storage(config.storage_config())
    try:  # read and close: chDB allows one process per data dir, sending may take long
        lines = CurrentLinesQuery(start, end, storage.database).run(storage)
    finally:
        storage.close()
    return items_from_lines(lines, include_in_progress=settings.include_in_progress)


def run(args: argparse.Namespace, config: Any) -> int:
    from meterline.core.billing.periods import iso
    from meterline.export.engine import Exporter
    from meterline.export.ledger import ExportLedger
    from meterline.export.metrics import ExportMetrics

    env = os.environ
    settings = ExportSettings.from_args(args, config, env)
    ledger = ExportLedger(settings.ledger, policy=settings.policy())
    try:
        name = settings.target
        if args.status:
            return _status(ledger, name, settings, iso)
        target = build_target(settings, env)
        metrics = ExportMetrics()
        port = env.get("METERLINE_METRICS_PORT")
        if port:
            metrics.serve(int(port), env.get("METERLINE_METRICS_ADDR") or "127.0.0.1")
        exporter = Exporter(ledger, target, settings=settings.engine(), metrics=metrics)
        now_ms = time.time_ns() // 1_000_000
        conflicts: list[str] = []
        if args.replay:
            ledger.lock(name)
            past = bool(getattr(args, "replay_past_window", False))
            print(f"replay: {ledger.replay(name, now_ms, past_window=past)} dead letter(s) "
                  "re-queued")
            held = ledger.held_past_window(name)
            if held:
                print(f"replay: {held:,} item(s) past the target's idempotency window not "
                      "re-queued: check the target for their keys (--status), then "
                      "--replay-past-window")
        if settings.period is not None:
            items = _period_items(settings, config)
            queued = exporter.enqueue(items)
            conflicts = queued.conflicts
            print(f"export {settings.period} -> {name}: {len(items):,} item(s), "
                  f"{queued.new:,} new, {queued.known:,} already in the ledger"
                  + (f", {len(conflicts):,} CHANGED since enqueued" if conflicts else ""),
                  flush=True)
        report = exporter.run(until_drained=args.until_drained)
        closer = getattr(target, "close", None)
        if callable(closer):
            closer()
        counts = ledger.counts(name)
        print(f"sent {report.sent:,}, retried {report.retried:,}, failed {report.failed:,}"
              + (f", re-sent after a crash {report.recovered:,}" if report.recovered else "")
              + f"; ledger: {_states(counts)}")
        for key in report.failed_keys[:20]:
            print(f"  FAILED {key}")
        for key in conflicts[:20]:
            print(f"  CHANGED {key}: the rated line differs from what was enqueued; "
                  "a correction is needed")
        if report.pending:
            print(f"{report.pending:,} item(s) still pending (target unavailable?): run again, "
                  "or with --until-drained")
        return 1 if (report.failed or conflicts or report.pending) else 0
    finally:
        ledger.close()


def _states(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n:,} {s}" for s, n in counts.items())


def _status(ledger: Any, name: str, settings: ExportSettings, iso: Any) -> int:
    from meterline.export.ledger import HOLD_WINDOW

    period_range = None
    if settings.period is not None:
        from meterline.rating.stage import month_range

        period_range = month_range(settings.period)
    entries = ledger.entries(name, period_range=period_range)
    counts: dict[str, int] = {"pending": 0, "sending": 0, "sent": 0, "failed": 0}
    for e in entries:
        counts[e.state] += 1
    print(f"export ledger {settings.ledger} target {name}"
          + (f" period {settings.period}" if settings.period else "") + f": {_states(counts)}")
    held = sum(e.hold == HOLD_WINDOW for e in entries)
    if held:
        print(f"  {held:,} failed item(s) are past the target's idempotency window: check the "
              "target holds none of them before --replay-past-window (--replay skips them)")
    for e in entries:
        if e.state == "failed":
            print(f"  FAILED {e.key} after {e.attempts} attempt(s): {e.last_response}")
        elif e.state in ("pending", "sending") and e.attempts:
            print(f"  {e.state.upper()} {e.key} attempt {e.attempts}, next "
                  f"{iso(e.next_attempt_ms)}: {e.last_response}")
    return 1 if counts["failed"] else 0


# --------------------------------------------------------------------------- reconcile


def add_reconcile_options(parser: argparse.ArgumentParser) -> None:
    """``meterline reconcile --target T``: the export's last hop (meterline/rating/commands.py
    adds these to its reconcile parser)."""
    parser.add_argument("--target", default=None, choices=TARGETS,
                        help="also compare rated lines vs the export ledger vs what this "
                             "target received")
    parser.add_argument("--out", type=Path, default=None, help="files target directory")
    parser.add_argument("--ledger", type=Path, default=None, help="export ledger")


def reconcile_command(args: argparse.Namespace, config: Any, storage: Any) -> int:
    from meterline.export.ledger import ExportLedger
    from meterline.export.reconcile import reconcile_export

    env = os.environ
    path = args.ledger or default_ledger_path(config, env)
    target: Any | None = None
    note = ""
    if args.target == "files":
        from meterline.export.files_target import FilesTarget

        target = FilesTarget(args.out or path.parent / "export-files")
    elif args.target in PLUGIN_TARGETS:
        missing = [n for n in PLUGIN_TARGETS[args.target][2] if not env.get(n)]
        if missing:
            note = f" (target not asked: {', '.join(missing)} not set)"
        else:
            config_path = env.get("METERLINE_EXPORT_TARGET_CONFIG")
            probe = ExportSettings(args.target, args.period, path, path.parent, "", "", False,
                                   1, 1, 1, 1.0, 1.0, 10.0, 1,
                                   Path(config_path) if config_path else None)
            target = build_target(probe, env)
    else:
        note = " (a webhook cannot list what it holds: rated vs ledger only)"
    ledger = ExportLedger(path)
    try:
        result = reconcile_export(storage, ledger, args.target,
                                  target if target is not None
                                  and getattr(target, "received", None) else None,
                                  period=args.period)
    finally:
        ledger.close()
    held = "-" if result.received is None else f"{result.received:,}"
    print(f"reconcile {args.period} -> {args.target}: {result.rated:,} final rated line(s), "
          f"{result.in_ledger:,} in the ledger ({result.sent:,} sent), {held} held by the "
          f"target{note}; {len(result.diffs):,} difference(s)")
    for d in result.diffs[:50]:
        print(f"  {d.problem.upper()} {d.key}: {d.detail}")
    return 1 if result.diffs else 0
