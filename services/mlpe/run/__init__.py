"""`mlpe run` (what `make run` calls): the whole promise in a few minutes.

Starts the stack and every service (stream, notify with a webhook sink or your Slack
webhook, control, optimizer), a simulated fleet of two 8-GPU nodes with a few faults (real
NVML instead on a machine with GPUs), plans a training job, submits a small real one
(CPU here), kills one of its workers midway and watches it recover. Shows a line of
progress every few seconds, prints a summary and writes an HTML report with plots read
back from InfluxDB. Leaves the stack as it found it unless --keep.

This file is the command line and the stack around the job; the job itself is
orchestrate.MainJob, its summary summary.py, its report report.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from pathlib import Path

from mlpe.common.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: a watched fleet with faults, alerts, a "
                       "planned, trained, crashed and recovered job, a report",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=bounded(float, 20, 3600), default=90.0,
                   help="seconds the simulated fleet runs, 20 to 3600 (90; its faults begin "
                        "at 25, 40 and 55 s)")
    p.add_argument("--steps", type=bounded(int, 100, 100_000), default=600,
                   help="training steps of the job, at least 100 so that the kill a third of "
                        "the way lands after the first checkpoint (600)")
    p.add_argument("--report", type=Path, default=None,
                   help="HTML report (default: <state dir>/run/<id>/report.html)")
    p.add_argument("--keep", action="store_true",
                   help="leave the stack running afterwards (default: as it was found)")
    p.set_defaults(func=run)


def bounded(kind, low, high):
    """An argparse type: `kind` of the text, refused outside low..high."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low}..{high}")
        return value
    return parse


def run(args, settings: Settings) -> int:
    """Bring the stack up, run the main job, and stop what this call started."""
    from mlpe import stack
    from mlpe.common.kafka import kafka_reachable
    from mlpe.run.orchestrate import MainJob

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # refused connects: we report
    before = {s.name: s.state for s in stack.status(settings)}
    print("mlpe run: starting Kafka, InfluxDB and Redis …", flush=True)
    stack.up(settings)
    if not kafka_reachable(settings.kafka_bootstrap):
        print(f"mlpe run: Kafka not reachable at {settings.kafka_bootstrap}", file=sys.stderr)
        return 1
    run_id = uuid.uuid4().hex[:6]
    work = settings.state_dir / "run" / run_id
    work.mkdir(parents=True, exist_ok=True)
    try:
        return MainJob(args, settings, run_id, work).execute()
    finally:
        started_here = tuple(n for n, state in before.items() if state != "up")
        if started_here and not args.keep:
            stack.down(settings, started_here)
            print(f"mlpe run: stopped {', '.join(started_here)} (it was not running before; "
                  "--keep leaves it up)")
