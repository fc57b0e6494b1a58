"""`mlpe agent`: flags, source selection, and the process's life (signals, stats, exit)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path

from mlpe.common import logs
from mlpe.common.settings import Settings

SOURCES = ("nvml", "host", "sim")
PID_MAX = 1 << 22  # Linux's highest possible pid


class UsageError(ValueError):
    """A bad flag value; the message names the flag."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "agent",
        help="sample GPUs (NVML or simulated) and the host, ship batches to Kafka",
        description="Sample every GPU at --hz and ship one columnar batch per device per "
        "flush interval to Kafka (mlpe.metrics.gpu / mlpe.metrics.host), spooling to disk "
        "while Kafka is away. The simulator also runs a simulated data-parallel training "
        "job, one rank per simulated GPU, and ships its step events to mlpe.events.train. "
        "Default source: NVML (+ host) when a GPU is present, else the simulator.",
    )
    p.add_argument("--source", default=None, metavar="LIST",
                   help="comma-separated sources from nvml, host, sim (default: nvml,host with "
                   "a GPU, else sim)")
    p.add_argument("--hz", default="100", help="GPU samples per second (default 100)")
    p.add_argument("--host-hz", default="10", help="host samples per second (default 10)")
    p.add_argument("--flush-ms", default="100",
                   help="one Kafka message per device this often (default 100 ms)")
    p.add_argument("--gpus", default=None,
                   help="sim: GPUs per node (default 8); nvml: indices to watch, e.g. 0,1,3")
    p.add_argument("--nodes", default=None, help="sim: number of simulated nodes (default 1)")
    p.add_argument("--scenario", default=None, metavar="FILE",
                   help="sim: YAML scenario with faults (format: mlpe/agent/scenarios/README.md)")
    p.add_argument("--seed", default=None, help="sim: override the scenario's seed")
    p.add_argument("--no-train-events", action="store_true",
                   help="sim: do not ship the simulated training job's step events "
                   "(TrainStep, one per rank per step) to mlpe.events.train")
    p.add_argument("--node-id", default=None,
                   help="node id (default: host name; sim: prefix of simulated node ids and of "
                   "the simulated training job id)")
    p.add_argument("--job", default=None,
                   help="the job this node works for, carried by every batch so the stream "
                   "compares its GPUs with the job's other GPUs (default: $MLPE_JOB_ID; sim: "
                   "the simulated job's id, none with --pids; without one the stream takes "
                   "the job whose pids mlpe.placement places on the GPU)")
    p.add_argument("--pids", default=None, metavar="GPU=PID,...",
                   help="sim: the process on each of these GPUs, e.g. 0=4242,1=4243, on every "
                   "simulated node: each reports its memory once a second as NVML does, so "
                   "the stream can learn the GPU's job from mlpe.placement; the GPU batches "
                   "then carry no simulated job id (unless --job, $MLPE_JOB_ID or the "
                   "scenario's job_id)")
    p.add_argument("--duration", default=None, help="stop after this many seconds")
    p.add_argument("--spool-dir", default=None,
                   help="where batches wait while Kafka is away (default <state dir>/spool/agent)")
    p.add_argument("--linger-ms", default="200",
                   help="how long batches wait to share a Kafka request (default 200 ms: "
                   "fewer wake-ups, lower CPU; less = lower latency)")
    p.add_argument("--spool-max-mb", default="512", help="spool bound in MiB (default 512)")
    p.add_argument("--stats-json", default=None, metavar="FILE",
                   help="write final counters (values, batches, jitter, spool) here as JSON")
    p.set_defaults(func=run)


def _number(args, name: str, low: float, high: float, kind=float, unit: str = "") -> float:
    raw = getattr(args, name.replace("-", "_"))
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        raise UsageError(f"--{name} {raw!r}: expected {what} from {low:g} to {high:g}{unit}")
    return value


def parse_sources(raw: str | None, gpu_present: bool) -> list[str]:
    if raw is None:
        return ["nvml", "host"] if gpu_present else ["sim"]
    chosen = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [s for s in chosen if s not in SOURCES]
    if unknown or not chosen:
        raise UsageError(f"--source {raw!r}: unknown source {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(SOURCES)}")
    return list(dict.fromkeys(chosen))


def parse_pids(raw: str, gpus_per_node: int) -> dict[int, int]:
    """--pids "0=4242,1=4243" -> {0: 4242, 1: 4243}."""
    pids: dict[int, int] = {}
    for part in raw.split(","):
        gpu, sep, pid = part.strip().partition("=")
        try:
            gpu_index, pid_number = int(gpu), int(pid)
        except ValueError:
            gpu_index = pid_number = -1
        if not sep or gpu_index < 0 or not 0 < pid_number <= PID_MAX:
            raise UsageError(f"--pids {raw!r}: expected GPU=PID pairs like 0=4242,1=4243 "
                             f"(pids from 1 to {PID_MAX})")
        if gpu_index >= gpus_per_node:
            raise UsageError(f"--pids {raw!r}: GPU {gpu_index} is not one of the "
                             f"{gpus_per_node} simulated GPUs per node (0 to "
                             f"{gpus_per_node - 1})")
        if gpu_index in pids:
            raise UsageError(f"--pids {raw!r}: GPU {gpu_index} is given twice")
        pids[gpu_index] = pid_number
    return pids


def build(args, settings: Settings):
    """Flags -> (Agent, its sources); raises UsageError or ScenarioError on bad input."""
    from mlpe.agent import scenario as scenario_module
    from mlpe.agent.agent import Agent, inventory_records
    from mlpe.agent.shipper import Shipper
    from mlpe.agent.sources.nvml import nvml_available
    from mlpe.agent.spool import Spool
    from mlpe.v1 import metrics_pb2 as pb

    hz = _number(args, "hz", 0.1, 1000, unit=" samples per second")
    host_hz = _number(args, "host-hz", 0.1, 1000, unit=" samples per second")
    flush_ms = _number(args, "flush-ms", 1, 60_000, unit=" ms")
    spool_mb = _number(args, "spool-max-mb", 1, 1 << 20, int, " MiB")
    linger_ms = _number(args, "linger-ms", 0, 10_000, unit=" ms")
    duration = _number(args, "duration", 0.01, 1e9, unit=" s") if args.duration else None
    explicit = args.source is not None
    gpu_present = not explicit and nvml_available()
    names = parse_sources(args.source, gpu_present)
    if not explicit and not gpu_present:
        print("mlpe agent: no NVIDIA GPU found; using the simulator (--source sim)",
              file=sys.stderr, flush=True)
    node_id = args.node_id or socket.gethostname()
    job_id = args.job or settings.job_id
    if args.pids is not None and "sim" not in names:
        raise UsageError(f"--pids {args.pids!r}: only for the simulator (--source sim); "
                         "NVML reports real processes itself")

    sources = []
    training = None
    inventory: dict[str, pb.NodeInventory] = {}
    if "sim" in names:
        from mlpe.agent.sources.sim import DEFAULT_NODE_PREFIX, SimulatedGpus
        from mlpe.agent.sources.train_sim import SimulatedTraining

        scenario = (scenario_module.load(args.scenario) if args.scenario
                    else scenario_module.Scenario())
        overrides = {}
        if args.nodes is not None:
            overrides["nodes"] = _number(args, "nodes", 1, 10_000, int)
        if args.gpus is not None:
            overrides["gpus_per_node"] = _number(args, "gpus", 1, 64, int, " GPUs per node")
        if args.seed is not None:
            overrides["seed"] = _number(args, "seed", 0, 2**63 - 1, int)
        if overrides:
            scenario = dataclasses.replace(scenario, **overrides)
        prefix = f"{args.node_id}-" if args.node_id else DEFAULT_NODE_PREFIX
        pids = None if args.pids is None else parse_pids(args.pids, scenario.gpus_per_node)
        sim = SimulatedGpus(scenario, hz, node_prefix=prefix, pids=pids)
        sources.append((sim, hz))
        simulated_job = SimulatedTraining(scenario, hz, node_prefix=prefix)
        # With --pids the stream learns the GPUs' job from mlpe.placement: none unless asked.
        default_job = (scenario.job_id or "") if pids is not None else simulated_job.job_id
        job_id = job_id or default_job
        if not args.no_train_events:
            training = simulated_job
        inventory.update(sim.node_inventories())
    if "nvml" in names:
        from mlpe.agent.sources.nvml import NvmlGpus

        indices = None
        if args.gpus is not None and "sim" not in names:
            try:
                indices = [int(i) for i in args.gpus.split(",")]
            except ValueError:
                raise UsageError(f"--gpus {args.gpus!r}: expected GPU indices like 0,1,3") \
                    from None
        try:
            nvml = NvmlGpus(hz, node_id, indices)
        except ValueError as err:
            raise UsageError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - pynvml raises its own hierarchy
            raise UsageError(f"--source nvml: NVML is not usable here: {err}") from None
        sources.append((nvml, hz))
        inventory[node_id] = pb.NodeInventory(node_id=node_id, hostname=socket.gethostname(),
                                              source="nvml", gpus=nvml.inventory())
    if "host" in names:
        from mlpe.agent.sources.host import HostMetrics

        sources.append((HostMetrics(node_id), host_hz))
        inventory.setdefault(node_id, pb.NodeInventory(node_id=node_id, source="host",
                                                       hostname=socket.gethostname()))
    now = time.time_ns()
    for record in inventory.values():
        record.time_ns = now
    spool_dir = Path(args.spool_dir) if args.spool_dir else settings.state_dir / "spool" / "agent"
    spool = Spool(spool_dir, max_bytes=spool_mb << 20)
    shipper = Shipper(settings.kafka_bootstrap, spool, linger_ms=linger_ms)
    agent = Agent(sources, shipper, hz=hz, flush_s=flush_ms / 1000,
                  inventory=inventory_records(list(inventory), inventory.__getitem__),
                  training=training, job_id=job_id)
    return agent, duration


async def _run(agent, duration, log) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    task = asyncio.create_task(agent.run(duration))
    started = time.monotonic()
    while not task.done():
        await asyncio.wait({task}, timeout=10)
        s, ship = agent.stats, agent.shipper.stats
        elapsed = max(time.monotonic() - started, 1e-9)
        log.info("agent stats", values=s.values, values_per_s=round(s.values / elapsed),
                 batches=s.batches, train_steps=s.train_steps, sent=ship.sent, spooled=ship.spooled,
                 spool_records=len(agent.shipper.spool), lost=agent.shipper.spool.lost,
                 kafka_up=agent.shipper.up, tick_jitter_p99_ms=round(s.jitter_ms(99), 3),
                 late_ticks=s.late_ticks)
    task.result()


def run(args, settings: Settings) -> int:
    from mlpe.agent.scenario import ScenarioError

    log = logs.configure("agent", settings.log_level, settings.log_format)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the shipper reports outages
    try:
        agent, duration = build(args, settings)
    except (UsageError, ScenarioError) as err:
        print(f"mlpe agent: {err}", file=sys.stderr, flush=True)
        return 2
    log.info("agent starting", sources=[b.source.name for b in agent.buffers],
             devices=sum(len(b.source.devices) for b in agent.buffers), hz=agent.hz,
             kafka=settings.kafka_bootstrap)
    asyncio.run(_run(agent, duration, log))
    summary = final_stats(agent)
    log.info("agent stopped", **summary)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(summary))
    return 0


def final_stats(agent) -> dict:
    s, ship, spool = agent.stats, agent.shipper.stats, agent.shipper.spool
    return {"ticks": s.ticks, "samples": s.samples, "values": s.values, "batches": s.batches,
            "events": s.events, "train_steps": s.train_steps, "late_ticks": s.late_ticks,
            "tick_jitter_p50_ms": round(s.jitter_ms(50), 3),
            "tick_jitter_p99_ms": round(s.jitter_ms(99), 3),
            "sent": ship.sent, "acked_bytes": ship.acked_bytes, "spooled": ship.spooled,
            "outages": ship.outages, "spool_records": len(spool), "lost": spool.lost,
            "started_ns": agent.start_ns, "stopped_at": s.stopped_at,
            "cpu_at_stop": s.cpu_at_stop}
