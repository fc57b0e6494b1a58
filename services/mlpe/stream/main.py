"""`mlpe stream`: run a Faust worker of the stream processor (several share the partitions)."""

from __future__ import annotations

import argparse

from mlpe.common.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stream",
        help="aggregate metric batches into 1 s / 10 s windows in InfluxDB (Faust worker)",
        description="A Faust worker of the stream processor: consumes mlpe.metrics.gpu and "
        "mlpe.metrics.host, writes 1 s and 10 s min/mean/max/p95/last per field to InfluxDB, "
        "sends undecodable input to mlpe.deadletter. Start several to share the partitions. "
        "MLPE_STREAM_LATENESS_S (default 0.3) is how long a window waits for late samples.",
    )
    p.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    from faust.worker import Worker

    from mlpe.stream.app import app

    worker = Worker(app, loglevel=settings.log_level.upper(), quiet=True)
    worker.execute_from_commandline()  # exits the process when the worker stops
    return 0
