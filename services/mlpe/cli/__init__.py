"""`mlpe`: the one command-line entry point. Each service registers its own subcommands
(`register(sub)` in its main module); `version`, `stack` and `tail` are the CLI's own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from mlpe.common import settings as settings_module
from mlpe.common.settings import SettingsError


def mlpe_version() -> str:
    try:
        return package_version("mlpe")
    except PackageNotFoundError:
        return "0+unknown"


def _only(value: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in value.split(",") if part.strip()) if value else None


def _print_statuses(statuses, as_json: bool) -> None:
    if as_json:
        print(json.dumps([s.as_dict() for s in statuses], indent=2))
        return
    rows = [("COMPONENT", "STATE", "VERSION", "ADDRESS", "DETAIL")]
    rows += [(s.name, s.state, s.version or "-", s.address, s.detail) for s in statuses]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + "  " + row[4])


def cmd_version(args, settings) -> int:
    from mlpe.stack.influxdb import VERSION as INFLUXD_VERSION
    from mlpe.stack.kafka import kafka_version

    print(f"mlpe {mlpe_version()} (python {sys.version.split()[0]}; "
          f"kafka {kafka_version()}, influxd {INFLUXD_VERSION})")
    return 0


def cmd_stack(args, settings) -> int:
    from mlpe import stack
    from mlpe.common.kafka import SHORT_LIVED_APPS

    # aiokafka logs every refused connection; the CLI reports the outcome itself.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    only = _only(args.only)
    if args.action == "install":
        stack.install(settings, only)
        print("stack: everything installed (cached in " f"{settings.cache_dir})")
        return 0
    if args.action == "up":
        statuses = stack.up(settings, only)
        _print_statuses(statuses, args.json)
        return 0 if all(s.state == "up" for s in statuses) else 1
    if args.action == "topics":
        created = stack.ensure_topics(settings)
        print(f"kafka: created {', '.join(created)}" if created else "kafka: all topics exist")
        return 0
    if args.action == "prune":
        prefixes = tuple(args.prefix or SHORT_LIVED_APPS)
        pruned = stack.prune(settings, prefixes)
        named = " or ".join(f"{p}*" for p in prefixes)
        print(f"kafka: deleted {sum(pruned.values())} topics of {len(pruned)} finished apps "
              f"named {named}" if pruned else f"kafka: no finished app named {named} has topics")
        return 0
    if args.action == "buckets":
        from mlpe.common.tokens import influx_token
        from mlpe.stack import retention
        from mlpe.stack.influxdb import http_json

        token = influx_token(settings)
        if not token:
            print("mlpe stack buckets: no InfluxDB token (MLPE_INFLUX_TOKEN)", file=sys.stderr)
            return 1
        retention.ensure(settings, http_json, settings.influx_url.rstrip("/"), token)
        print("influxdb: " + ", ".join(f"{name} ({seconds // 86_400 or 'for ever'} d)"
                                       for name, seconds in settings.influx_buckets.items()))
        return 0
    if args.action == "down":
        for name, outcome in stack.down(settings, only):
            print(f"{name}: {outcome}")
        return 0
    statuses = stack.status(settings, only)
    _print_statuses(statuses, args.json)
    return 0 if all(s.state == "up" for s in statuses) else 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlpe",
        description="mlpe: see every GPU at 100 Hz, be told what is wrong within seconds, "
        "and plan and run training that goes faster and fails less.",
        epilog="Settings come from MLPE_* environment variables; see README.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    version = sub.add_parser("version", help="print mlpe's version and its components'")
    version.set_defaults(func=cmd_version)

    from mlpe.common.kafka import SHORT_LIVED_APPS

    stack = sub.add_parser(
        "stack",
        help="the local Kafka, InfluxDB and Redis (no Docker)",
        description="Install, start, stop and inspect the local stack. Data and logs live "
        "in $MLPE_STATE_DIR (default ~/.local/state/mlpe, one per user like the ports); "
        "downloads and builds are cached per user ($MLPE_CACHE_DIR, ~/.cache/mlpe).",
    )
    stack.add_argument(
        "action",
        choices=("install", "up", "down", "status", "topics", "buckets", "prune"),
        help="install: fetch/build what is missing; up: install, start and wait until "
        "ready, create topics (harmless if running); down: stop what up started; "
        "status: state, version and address of each (exit 3 if any is down); "
        "topics: create the mlpe topics on the configured Kafka (e.g. docker-compose's); "
        "buckets: the InfluxDB buckets per resolution with their retention and the 1 min "
        "downsampling task on the configured InfluxDB (up does this too); "
        "prune: delete the internal topics of finished stream apps named test-*, bench-* "
        "or run-* (no member left in their group; `make test` does this first)",
    )
    stack.add_argument("--prefix", action="append", metavar="APP_PREFIX",
                       help="prune: only apps whose id starts with this (repeatable; default "
                       f"{', '.join(SHORT_LIVED_APPS)})")
    stack.add_argument("--only", metavar="NAMES",
                       help="comma-separated subset of kafka,influxdb,redis")
    stack.add_argument("--json", action="store_true", help="status as JSON")
    stack.set_defaults(func=cmd_stack)

    from mlpe import bench
    from mlpe import run as run_main
    from mlpe.agent import main as agent_main
    from mlpe.cli import tail
    from mlpe.control import client as jobs_client
    from mlpe.control import main as control_main
    from mlpe.notify import main as notify_main
    from mlpe.optimizer import cli as optimizer_cli
    from mlpe.stream import main as stream_main
    from mlpe.worker import main as worker_main

    agent_main.register(sub)
    stream_main.register(sub)
    notify_main.register(sub)
    control_main.register(sub)
    jobs_client.register(sub)
    worker_main.register(sub)
    optimizer_cli.register(sub)
    run_main.register(sub)
    tail.register(sub)
    bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mlpe.stack.component import StackError

    args = build_parser().parse_args(argv)
    try:
        settings = settings_module.load()
        return args.func(args, settings)
    except SettingsError as err:
        print(f"mlpe: configuration error: {err}", file=sys.stderr)
        return 2
    except StackError as err:
        print(f"mlpe: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlpe: interrupted", file=sys.stderr)
        return 130

