"""`meterline` command line: demo, migrate, load-raw, rollup-local, usage."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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

    worker = sub.add_parser("worker", help="Kafka usage topic -> hourly/daily rollups (Faust "
                            "worker; outputs go to <topic>.rollups/.dead-letters/.late-events)")
    _metrics_options(worker)

    load_rollups = sub.add_parser("load-rollups",
                                  help="the worker's output topics -> ClickHouse tables")
    load_rollups.add_argument("--until-idle", type=float, default=None, metavar="SECONDS",
                              help="stop after this long without new records")
    _metrics_options(load_rollups)

    usage = sub.add_parser("usage", help="print exact usage of one customer")
    usage.add_argument("customer")
    usage.add_argument("--meter")

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
    if args.command == "usage":
        from meterline.demo import print_usage

        print_usage(config, args.customer, args.meter)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
