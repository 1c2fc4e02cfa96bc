"""`meterline` command line: demo, migrate, load-raw, rollup-local, usage, and the billing
commands (plans, subscriptions, rate, explain, invoice, simulate, reconcile)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from meterline.core.errors import MeterlineError
from meterline.logs import configure_logging, redact
from meterline.sinks.exceptions import SinkError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meterline", description="Exact usage metering.")
    parser.add_argument("--config", type=Path, help="meterline.toml (default: built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="log lines as text or JSON (default: $METERLINE_LOG_FORMAT, "
                             "else text); errors carry topic, partition, offset, batch_id")
    # --- server (issue 11): --version ---------------------------------------------------
    parser.add_argument("--version", action="version", version=f"meterline {_version()}")
    # --- end server -------------------------------------------------------------------
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the pipeline end to end on embedded chDB")
    demo.add_argument("--events", type=int, default=1_000_000)
    demo.add_argument("--customers", type=int, default=1_000)
    demo.add_argument("--workdir", type=Path, default=Path("var/demo"))
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    sub.add_parser("migrate", help="create or update the ClickHouse schema (idempotent)")

    load = sub.add_parser("load-raw", help="Kafka -> raw events in ClickHouse")
    load.add_argument("--until-idle", type=float, default=None, metavar="SECONDS",
                      help="stop after this long without new records (default: run forever)")
    _metrics_options(load)

    rollup = sub.add_parser("rollup-local",
                            help="embedded local log -> hourly/daily rollups (no Kafka)")
    rollup.add_argument("--log", type=Path, required=True, help="the local log (SQLite file)")
    rollup.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint file (default: <log>.rollup-checkpoints.db beside it)")
    rollup.add_argument("--group", default="rollups",
                        help="consumer name: its offsets and checkpoints (default: rollups)")
    rollup.add_argument("--until-idle", type=float, default=None, metavar="SECONDS",
                        help="stop after this long without new records (default: run forever)")
    _metrics_options(rollup)

    worker = sub.add_parser("worker", help="Kafka usage topic -> hourly/daily rollups (Faust "
                            "worker; outputs go to <topic>.rollups/.dead-letters/.late-events)")
    _metrics_options(worker)

    load_rollups = sub.add_parser("load-rollups",
                                  help="the worker's output topics -> ClickHouse tables")
    load_rollups.add_argument("--until-idle", type=float, default=None, metavar="SECONDS",
                              help="stop after this long without new records")
    _metrics_options(load_rollups)

    # --- anomaly stage (issue 12) -------------------------------------------------------
    anomalies = sub.add_parser(
        "anomalies", help="<topic>.rollups -> anomaly detectors -> <topic>.anomalies, "
        "webhook, metrics (Faust agent); --load: <topic>.anomalies -> ClickHouse")
    anomalies.add_argument("--settings", type=Path, default=None,
                           help="anomalies.toml: [detector], [stage], [webhook] "
                                "(default: built-in defaults, no webhook)")
    anomalies.add_argument("--load", action="store_true",
                           help="run the loader into the anomalies table instead")
    anomalies.add_argument("--until-idle", type=float, default=None, metavar="SECONDS",
                           help="--load: stop after this long without new records")
    _metrics_options(anomalies)
    # --- end anomaly stage ---------------------------------------------------------------

    usage = sub.add_parser("usage", help="print exact usage of one customer")
    usage.add_argument("customer")
    usage.add_argument("--meter")

    # --- server (issue 11): serve, keys, --config after the subcommand -----------------
    _server_commands(sub)
    _config_after_subcommand(sub)
    # --- end server -------------------------------------------------------------------

    from meterline.rating.commands import add_parsers as add_billing_parsers

    add_billing_parsers(sub)

    args = parser.parse_args(argv)
    configure_logging(args.log_format, logging.INFO if args.verbose else logging.WARNING)
    try:
        return _dispatch(args)
    except (MeterlineError, SinkError) as exc:
        # A clear one-line error, not a traceback: an unreachable server or a chDB
        # directory in use is an operator's problem to fix, not a bug.
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _metrics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus /metrics on this port "
                             "(default: $METERLINE_METRICS_PORT; unset: not served)")
    parser.add_argument("--metrics-addr", default=None, metavar="ADDR",
                        help="address to serve /metrics on (default: $METERLINE_METRICS_ADDR, "
                             "else 127.0.0.1; 0.0.0.0 to let other hosts scrape)")


def _apply_metrics_options(args: argparse.Namespace) -> None:
    # The stages read their metrics endpoint from the environment (the Faust worker is
    # started through Faust's own command line), so the options set it for them.
    import os

    if getattr(args, "metrics_port", None) is not None:
        os.environ["METERLINE_METRICS_PORT"] = str(args.metrics_port)
    if getattr(args, "metrics_addr", None) is not None:
        os.environ["METERLINE_METRICS_ADDR"] = args.metrics_addr


def _dispatch(args: argparse.Namespace) -> int:
    from meterline.config import load_config

    config = load_config(args.config)
    _apply_metrics_options(args)
    from meterline.rating import commands as billing_commands

    if args.command in billing_commands.COMMANDS:
        return billing_commands.run(args, config)
    if args.command in ("serve", "keys"):  # server (issue 11)
        return _dispatch_server(args, config)
    if args.command == "demo":
        from meterline.demo import run_demo

        result = run_demo(
            args.workdir, events=args.events, customers=args.customers, seed=args.seed,
            progress=not args.no_progress, config=config,
        )
        return 0 if result.exact else 1
    if args.command == "migrate":
        from meterline.sinks.schema import migrate
        from meterline.sinks.storage import open_storage

        storage = open_storage(config.storage_config())
        try:
            applied = migrate(storage, storage.database, config.retention_policy())
        finally:
            storage.close()
        # The statements themselves are for -v; a person wants to know what changed.
        for sql in applied.statements:
            logging.getLogger("meterline.migrate").info("applied: %s", sql.splitlines()[0])
        done = len(applied.statements)
        print(f"schema up to date in {storage.database} "
              f"({done} statement{'s' if done != 1 else ''} applied)" if done
              else f"schema up to date in {storage.database} (nothing to change)")
        return 0
    if args.command == "load-raw":
        from meterline.ingest.raw_loader import run_kafka_loader

        run_kafka_loader(config, until_idle_s=args.until_idle)
        return 0
    if args.command == "rollup-local":
        from meterline.aggregators.embedded import run_rollup_local

        run_rollup_local(config, args.log, checkpoint_path=args.checkpoint, group=args.group,
                         until_idle_s=args.until_idle)
        return 0
    if args.command == "worker":
        from meterline.aggregators.faust_worker import run_worker

        run_worker(config)
        return 0
    if args.command == "load-rollups":
        from meterline.aggregators.outputs_io import run_kafka_output_loader

        run_kafka_output_loader(config, until_idle_s=args.until_idle)
        return 0
    if args.command == "anomalies":  # anomaly stage (issue 12)
        from meterline.aggregators.anomaly_faust import run_anomalies, run_anomaly_loader

        if args.load:
            run_anomaly_loader(config, until_idle_s=args.until_idle)
        else:
            run_anomalies(config, args.settings)
        return 0
    if args.command == "usage":
        from meterline.demo import print_usage

        print_usage(config, args.customer, args.meter)
        return 0
    raise AssertionError(args.command)


# --- server (issue 11) ------------------------------------------------------------------


def _version() -> str:
    # Read from the installed metadata here: importing the server package (and its web
    # stack) on every command just to print a version slowed every start.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meterline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _server_commands(sub: Any) -> None:
    serve = sub.add_parser(
        "serve", help="HTTP ingest + usage/quota API; on the embedded default also the whole "
                      "pipeline (local log -> raw events + rollups -> chDB) in this process",
        description="Serve the HTTP API (docs/server.md). Settings: [server] in --config.")
    serve.add_argument("--host", default=None, help="address to bind (default: [server] host, "
                                                    "else 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None,
                       help="port (default: [server] port, else 8080; 0: any free port)")
    serve.add_argument("--kafka", action="store_true",
                       help="HTTP front only: events into the [kafka] topic (acks=all), "
                            "reads from [storage]; the stages run as separate workers")
    _metrics_options(serve)
    keys = sub.add_parser("keys", help="create, list or revoke API keys",
                          description="API keys are stored hashed in [server] keys_file.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--tenant", required=True,
                        help="the tenant whose customers the key may write/read "
                             "([a-z0-9][a-z0-9_-]{0,31})")
    create.add_argument("--scope", action="append", choices=("ingest", "read", "admin"),
                        required=True, help="ingest, read or admin (repeat for several)")
    create.add_argument("--name", default="", help="a note to recognise the key by")
    keys_sub.add_parser("list", help="list keys (ids, tenants, scopes; never secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="the id shown by 'keys list' (12 hex characters)")


def _config_after_subcommand(sub: Any) -> None:
    """``meterline serve --config x.toml`` as well as ``meterline --config x.toml serve``:
    every subcommand (nested ones too) takes --config; given there, it wins."""
    for parser in sub.choices.values():
        if not any("--config" in a.option_strings for a in parser._actions):
            parser.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                                help="meterline.toml (also accepted before the subcommand)")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _config_after_subcommand(action)


def _dispatch_server(args: argparse.Namespace, config: Any) -> int:
    from meterline.server.keys import KeyStore
    from meterline.server.settings import from_config

    settings = from_config(config)
    if args.command == "keys":
        store = KeyStore(settings.keys_file)
        try:
            if args.keys_command == "create":
                key, info = store.create(args.tenant, args.scope, args.name)
                print(key)
                print(f"created key {info.key_id} for tenant {info.tenant!r} "
                      f"(scopes: {', '.join(info.scopes)}); the key is shown only now",
                      file=sys.stderr)
            elif args.keys_command == "list":
                for k in store.list():
                    state = "revoked" if k.revoked_ms is not None else "active"
                    print(f"{k.key_id}  {k.tenant:<16} {','.join(k.scopes):<20} {state:<8} "
                          f"{k.name}")
            else:
                if not store.revoke(args.key_id):
                    print(f"error: no active key {args.key_id!r}", file=sys.stderr)
                    return 2
                print(f"revoked {args.key_id}")
        finally:
            store.close()
        return 0
    import dataclasses

    from meterline.server.runtime import serve

    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.kafka:
        overrides["pipeline"] = "kafka"
    settings = dataclasses.replace(settings, **overrides)
    store = KeyStore(settings.keys_file)
    try:
        if len(store) == 0:
            # A fresh install has no key, so nothing could use the API: make the first one
            # (printed once, like a notebook token) and say how to manage keys.
            key, info = store.create("default", ["admin"], "created by the first serve")
            print(f"no API keys yet: created admin key {info.key_id} for tenant 'default':\n"
                  f"  {key}\n(shown once; manage keys with 'meterline keys create/list/revoke')",
                  flush=True)
    finally:
        store.close()

    def listening(url: str) -> None:
        where = (f"local log {settings.local_log}" if settings.pipeline == "embedded"
                 else f"Kafka topic {config.kafka.topic}")
        print(f"meterline serve: listening on {url} ({settings.pipeline} pipeline, {where})",
              flush=True)

    serve(config, settings, on_listening=listening)
    return 0

# --- end server -------------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())
