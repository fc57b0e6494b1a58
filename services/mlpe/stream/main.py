"""`mlpe stream`: run a Faust worker of the stream processor (several share the partitions)."""

from __future__ import annotations

import argparse
import sys

from mlpe.common.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stream",
        help="aggregate telemetry into InfluxDB and detect anomalies (Faust worker)",
        description="A Faust worker of the stream processor: consumes mlpe.metrics.gpu, "
        "mlpe.metrics.host and mlpe.events.train; writes 1 s and 10 s min/mean/max/p95/last "
        "per field (GPU, host, and training per job and rank) to InfluxDB; runs the event, "
        "rule ($MLPE_RULES), statistical, trend, cross-peer and training detectors, their "
        "state in Faust tables; sends alerts to mlpe.alerts (and InfluxDB, for Grafana) and "
        "undecodable or invalid input to mlpe.deadletter. Start several to share the "
        "partitions. MLPE_STREAM_LATENESS_S (default 0.3) is how long a window waits for "
        "late samples.",
    )
    p.set_defaults(func=run)

    rules = sub.add_parser("rules", help="threshold rules: check a rules file")
    rules.add_argument("action", choices=("check",))
    rules.add_argument("file", help="rules YAML (format: deploy/rules/README.md)")
    rules.set_defaults(func=check_rules)


def check_rules(args, settings: Settings) -> int:
    from mlpe.common.batches import field_name
    from mlpe.stream.rules import RulesError, load

    try:
        rules = load(args.file)
    except RulesError as err:
        print(f"mlpe rules: {err}", file=sys.stderr)
        return 2
    for rule in rules:
        print(f"  {rule.name}: {rule.measurement}.{field_name(rule.field)}.{rule.stat} "
              f"{rule.op} {rule.threshold:g} "
              f"for {rule.hold_s:g}s")
    print(f"{args.file}: {len(rules)} rule(s) OK")
    return 0


def run(args, settings: Settings) -> int:
    from faust.worker import Worker

    from mlpe.stream.rules import RulesError, load

    if settings.rules_path:
        try:
            load(settings.rules_path)
        except RulesError as err:  # refuse to start, pointing at the line
            print(f"mlpe stream: {err}", file=sys.stderr)
            return 2

    from mlpe.stream.app import app

    worker = Worker(app, loglevel=settings.log_level.upper(), quiet=True)
    worker.execute_from_commandline()  # exits the process when the worker stops
    return 0
