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
        "mlpe.metrics.host and mlpe.events.train; writes 1 s and 10 s min/mean/max/last (p95 "
        "at 10 s) per field (GPU, host, and training per job and rank) to InfluxDB; runs the "
        "event, rule ($MLPE_RULES), statistical, trend, cross-peer and training detectors, their "
        "state in Faust tables; sends alerts to mlpe.alerts (and InfluxDB, for Grafana) and "
        "undecodable or invalid input to mlpe.deadletter. GPU batches without a job get "
        "the job whose pids (mlpe.placement, read whole by every worker) run on the GPU. "
        "Start several to share the partitions. MLPE_STREAM_LATENESS_S (default 0) is "
        "how long a window waits for late samples.",
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

    from mlpe.common import prices

    try:
        prices.load(settings.prices_path)  # the fleet's gpu_cost points need it
    except prices.PriceError as err:
        print(f"mlpe stream: {err}", file=sys.stderr)
        return 2

    prepare_kafka(settings)
    from mlpe.stream.app import StreamApp

    stream = StreamApp(settings)
    class QuietWorker(Worker):
        """Faust's worker without its terminal spinner. For the spinner to turn on every
        record, Faust set the root logger to DEBUG at any level of WARNING or above:
        every debug call of aiokafka and Faust on the hot path built a LogRecord that
        was then dropped (~5 % of a worker's CPU in `mlpe bench pipeline`)."""

        def on_setup_root_logger(self, logger, level: int) -> None:
            self.spinner = None

    worker = QuietWorker(stream.app, loglevel=settings.log_level.upper(), quiet=True)
    worker.execute_from_commandline()  # exits the process when the worker stops
    return 0


def prepare_kafka(settings: Settings) -> None:
    """Before the worker subscribes: create the app's `<app id>-gpu-seconds` topic, and
    with MLPE_STREAM_START=latest pin a new app's start at the topics' ends now.

    Faust creates the topic too, but a first subscription that races the creation logs
    "Ignoring missing topic" and never consumes it: the peer, statistical and trend
    detectors would then see nothing until the next rebalance (seen in `mlpe run`).
    mlpe.placement too, should `mlpe stack up` not have made it: every worker reads it
    (compacted, as declared). Left to the consumers, "latest" was resolved at their
    first fetch, after the groups formed and Faust recovered its tables: what agents
    sent meanwhile was skipped, and `mlpe bench detect` right after a fresh stack missed
    the faults of its first seconds."""
    import asyncio
    import logging

    from mlpe.common.kafka import create_topics, pin_start
    from mlpe.common.topics import (
        COST_EVENTS,
        GPU_METRICS,
        GPU_SECONDS,
        HOST_METRICS,
        KERNEL_EVENTS,
        PLACEMENT,
        TRAIN_EVENTS,
        metrics_group,
        of_app,
    )

    topic = of_app(GPU_SECONDS, settings.stream_app_id)
    app_id, bootstrap = settings.stream_app_id, settings.kafka_bootstrap

    async def prepare() -> None:
        await create_topics(bootstrap, [topic, PLACEMENT])
        if settings.stream_start == "latest":
            faust_read = [TRAIN_EVENTS, KERNEL_EVENTS, COST_EVENTS, topic]
            pinned = await pin_start(bootstrap, app_id, [t.name for t in faust_read])
            pinned += await pin_start(bootstrap, metrics_group(app_id),
                                      [GPU_METRICS.name, HOST_METRICS.name])
            if pinned:
                print(f"mlpe stream: {app_id} starts at the ends its {pinned} partitions have "
                      "now (MLPE_STREAM_START=latest)", file=sys.stderr, flush=True)

    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # a refused connection is reported below
    try:
        asyncio.run(prepare())
    except Exception as err:  # noqa: BLE001 - Kafka down: the worker waits for it itself
        print(f"mlpe stream: could not prepare {topic.name} yet ({err}); the worker will",
              file=sys.stderr)
    finally:
        kafka_log.setLevel(level)
