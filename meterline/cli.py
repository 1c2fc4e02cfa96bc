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
    # server (issue 11): a clear argparse error for 0 or negative counts
    demo.add_argument("--events", type=_positive_int, default=1_000_000,
                      help="usage events to generate (default: 1,000,000)")
    demo.add_argument("--customers", type=_positive_int, default=1_000,
                      help="customers to spread them over (default: 1,000)")
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
    rollup.add_argument("--anomaly-settings", type=Path, default=None,
                        help="anomalies.toml ([detector], [stage] early_warning, [webhook]) "
                             "for the anomaly detectors run on the rollups (default: "
                             "built-in defaults)")
    rollup.add_argument("--no-anomalies", action="store_true",
                        help="run no anomaly detectors")
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

    # --- server (issue 11): usage reads the rollups (meterline/usage_cli.py) ------------
    usage = sub.add_parser("usage", help="print one customer's exact usage from the rollups "
                           "(what billing, dashboards and the usage API read)")
    usage.add_argument("customer", help="the customer id (with --tenant: the tenant's own id)")
    usage.add_argument("--meter", help="only this meter (default: every meter)")
    usage.add_argument("--granularity", choices=("hour", "day", "month"), default=None,
                       help="list every window of this size (default: the period's total "
                            "per meter, from day windows)")
    usage.add_argument("--from", dest="start", metavar="TIME",
                       help="windows starting at or after: 2026-11-01, RFC 3339 or UTC ms "
                            "(default: 31 days before --to for day windows, as the API)")
    usage.add_argument("--to", dest="end", metavar="TIME",
                       help="windows starting before (default: the end of the current window)")
    usage.add_argument("--tenant", help="read a customer ingested through `meterline serve` "
                                        "with a key of this tenant")
    usage.add_argument("--json", action="store_true",
                       help="per meter, the document GET /api/v1/usage returns, plus totals")
    usage.add_argument("--server", metavar="URL",
                       help="read through a running `meterline serve` (it owns the chDB "
                            "directory) with the read key in $METERLINE_API_KEY")
    # --- end server -------------------------------------------------------------------

    # --- server (issue 11): serve, keys, --config after the subcommand -----------------
    _server_commands(sub)
    _config_after_subcommand(sub)
    # --- end server -------------------------------------------------------------------

    from meterline.rating.commands import add_parsers as add_billing_parsers

    add_billing_parsers(sub)
    # --- invoicing export (issue 10) -------------------------------------------------------
    from meterline.export.commands import add_parsers as add_export_parsers

    add_export_parsers(sub)
    # --- end invoicing export ----------------------------------------------------------------

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


def _positive_int(text: str) -> int:  # server (issue 11)
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    if args.command == "export":  # invoicing export (issue 10)
        from meterline.export import commands as export_commands

        return export_commands.run(args, config)
    if args.command in ("serve", "keys", "topics"):  # server (issue 11)
        return _dispatch_server(args, config)
    if args.command in ("load-raw", "worker", "load-rollups", "anomalies"):  # server (issue 11)
        _require_kafka(config, usage_topic=args.command == "worker")
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
                         until_idle_s=args.until_idle, anomaly_settings=args.anomaly_settings,
                         anomalies=not args.no_anomalies)
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
    if args.command == "usage":  # server (issue 11)
        from meterline.usage_cli import run_usage

        return run_usage(config, args.customer, meter=args.meter,
                         granularity=args.granularity, start=args.start, end=args.end,
                         tenant=args.tenant, as_json=args.json, server=args.server)
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
    topics = sub.add_parser(
        "topics", help="create the Kafka usage and output topics with the settings the "
                       "pipeline needs (message.timestamp.type=LogAppendTime)",
        description="Settings: [kafka] topic and bootstrap_servers; [server] topic_partitions, "
                    "topic_replication_factor, topic_retention_ms (docs/server.md).")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True)
    create_topics = topics_sub.add_parser(
        "create", help="create the usage topic and <topic>.rollups/.dead-letters/.late-events "
                       "if missing; check the ones that exist (refuses a usage topic "
                       "without LogAppendTime)")
    create_topics.add_argument("--partitions", type=_positive_int, default=None,
                               help="default: [server] topic_partitions, else 6")
    create_topics.add_argument("--replication-factor", type=_positive_int, default=None,
                               help="default: [server] topic_replication_factor, else 3 or "
                                    "the number of brokers if fewer")
    create_topics.add_argument("--retention-ms", type=int, default=None,
                               help="default: [server] topic_retention_ms, else 7 days; "
                                    "-1 keeps records forever")
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
    if args.command == "topics":
        return _topics(args, config, settings)
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
    if settings.pipeline == "kafka":
        _require_kafka(config, usage_topic=False)
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


def _require_kafka(config: Any, *, usage_topic: bool) -> None:
    """One line and exit 2 when Kafka is not there (KafkaUnreachable is a MeterlineError),
    before a stage starts retrying in the background; the worker also refuses a usage
    topic that is missing or not LogAppendTime."""
    from meterline.server.kafka_admin import check_usage_topic, require_kafka

    bootstrap = config.kafka.bootstrap_servers
    metadata = require_kafka(bootstrap)
    if usage_topic:
        check_usage_topic(bootstrap, config.kafka.topic, metadata)


def _topics(args: argparse.Namespace, config: Any, settings: Any) -> int:
    from meterline.server.kafka_admin import create_topics, plan_topics, require_kafka

    bootstrap = config.kafka.bootstrap_servers
    metadata = require_kafka(bootstrap)
    replication = (args.replication_factor or settings.topic_replication_factor
                   or min(3, len(metadata.brokers)))
    plans = plan_topics(
        config.kafka.topic, partitions=args.partitions or settings.topic_partitions,
        replication_factor=replication,
        retention_ms=(args.retention_ms if args.retention_ms is not None
                      else settings.topic_retention_ms))
    for line in create_topics(bootstrap, plans, metadata):
        print(line)
    return 0

# --- end server -------------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())
