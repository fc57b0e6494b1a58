"""Agent benchmarks: `mlpe bench agent` (cost on one node) and `mlpe bench ingest` (ceiling).

Both run real `mlpe agent` processes against the configured Kafka and print a
final JSON line. CPU is read from the kernel (/proc, wait4), not estimated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from mlpe.common.kafka import kafka_reachable
from mlpe.common.process import ManagedProcess
from mlpe.common.settings import Settings, environment

GPU_FIELDS_COUNT = 19


def register(sub) -> None:
    agent = sub.add_parser("agent", help="agent cost: simulator, 8 GPUs, every field, 100 Hz")
    agent.add_argument("--seconds", type=float, default=30.0, help="measured seconds (30)")
    agent.add_argument("--warmup", type=float, default=5.0,
                       help="seconds excluded at the start (imports, connection) (5)")
    agent.add_argument("--gpus", type=int, default=8)
    agent.add_argument("--hz", type=float, default=100.0)
    agent.set_defaults(bench=bench_agent)

    ingest = sub.add_parser("ingest", help="ingest ceiling: simulated nodes until it saturates")
    ingest.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="agent processes in parallel (default: one per core)")
    ingest.add_argument("--nodes", default="32,128,256,512,768",
                        help="nodes per process to try, in order (8 GPUs each); it stops at "
                        "the first step the machine cannot sustain")
    ingest.add_argument("--seconds", type=float, default=15.0, help="seconds per step (15)")
    ingest.add_argument("--warmup", type=float, default=4.0)
    ingest.set_defaults(bench=bench_ingest)


@dataclass
class AgentRun:
    stats: dict
    cpu_s: float          # CPU seconds over the measured window
    window_s: float
    startup_cpu_s: float
    rss_mb: float


def _start_agent(args: list[str], workdir: Path, name: str) -> tuple[subprocess.Popen, Path]:
    stats = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "mlpe.cli", "agent", "--source", "sim",
           "--spool-dir", str(workdir / f"{name}-spool"), "--stats-json", str(stats), *args]
    env = environment(MLPE_LOG_LEVEL="warning")
    log = (workdir / f"{name}.log").open("wb")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), stats


def _run_agents(specs: list[list[str]], duration: float, warmup: float) -> list[AgentRun]:
    """Start agents together, read their CPU after `warmup`, collect rusage at exit."""
    with tempfile.TemporaryDirectory(prefix="mlpe-bench-") as tmp:
        workdir = Path(tmp)
        procs = [_start_agent([*spec, "--duration", str(warmup + duration)], workdir, f"a{i}")
                 for i, spec in enumerate(specs)]
        time.sleep(warmup)  # the measured window starts here: a benchmark choice, not a wait
        marks = []
        for p, _ in procs:
            try:
                t = psutil.Process(p.pid).cpu_times()
                marks.append((t.user + t.system, time.time()))
            except psutil.NoSuchProcess:
                marks.append((0.0, time.time()))
        runs = []
        for (p, stats_path), (cpu0, t0) in zip(procs, marks, strict=True):
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode != 0 or not stats_path.exists():
                log = (workdir / f"{stats_path.stem}.log").read_text(errors="replace")
                raise RuntimeError(f"agent exited with {p.returncode}: {log[-800:]}")
            stats = json.loads(stats_path.read_text())
            # The window ends when sampling ends: draining and exit are not steady state.
            runs.append(AgentRun(stats=stats, cpu_s=stats["cpu_at_stop"] - cpu0,
                                 window_s=stats["stopped_at"] - t0, startup_cpu_s=cpu0,
                                 rss_mb=usage.ru_maxrss / 1024))
        return runs


def bench_agent(args, settings: Settings) -> dict:
    if not kafka_reachable(settings.kafka_bootstrap):
        raise SystemExit(f"mlpe bench agent: Kafka at {settings.kafka_bootstrap} is not "
                         "reachable; start it with `mlpe stack up`")
    print(f"bench agent: simulator, {args.gpus} GPUs, {len_fields()} fields, {args.hz:g} Hz, "
          f"{args.seconds:g} s measured after {args.warmup:g} s, into {settings.kafka_bootstrap}",
          flush=True)
    run, = _run_agents([["--gpus", str(args.gpus), "--nodes", "1", "--hz", str(args.hz)]],
                       args.seconds, args.warmup)
    s = run.stats
    total_s = args.warmup + args.seconds
    result = {
        "bench": "agent",
        "gpus": args.gpus,
        "hz": args.hz,
        "fields": len_fields(),
        "seconds": args.seconds,
        "cpu_pct_of_core": round(100 * run.cpu_s / run.window_s, 2),
        "startup_cpu_s": round(run.startup_cpu_s, 2),
        "rss_mb": round(run.rss_mb, 1),
        "values_per_s": round(s["values"] / total_s),
        "batches_acked": s["sent"] - 1,  # minus the inventory record
        "batches": s["batches"],
        "lost": s["lost"],
        "tick_jitter_p50_ms": s["tick_jitter_p50_ms"],
        "tick_jitter_p99_ms": s["tick_jitter_p99_ms"],
        "late_wakeups": s["late_ticks"],
    }
    print(f"  CPU {result['cpu_pct_of_core']}% of one core (after start-up), peak RSS "
          f"{result['rss_mb']} MB, {result['values_per_s']:,} values/s, tick jitter p50 "
          f"{result['tick_jitter_p50_ms']} ms / p99 {result['tick_jitter_p99_ms']} ms", flush=True)
    return result


def len_fields() -> int:
    from mlpe.common.batches import GPU_FIELDS

    return len(GPU_FIELDS)


def bench_ingest(args, settings: Settings) -> dict:
    if not kafka_reachable(settings.kafka_bootstrap):
        raise SystemExit(f"mlpe bench ingest: Kafka at {settings.kafka_bootstrap} is not "
                         "reachable; start it with `mlpe stack up`")
    try:
        steps = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        raise SystemExit(f"mlpe bench ingest: --nodes {args.nodes!r}: expected numbers "
                         "like 8,16,32") from None
    print(f"bench ingest: {args.processes} agent process(es), 8 GPUs x {len_fields()} fields "
          f"x 100 Hz per node, {args.seconds:g} s per step, into {settings.kafka_bootstrap}",
          flush=True)
    best, limited_by, rows = None, "not reached: try more --nodes", []
    for nodes in steps:
        _broker_cpu(settings)  # mark
        runs = _run_agents([["--nodes", str(nodes), "--seed", str(i)]
                            for i in range(args.processes)], args.seconds, args.warmup)
        produced = sum(r.stats["values"] for r in runs)
        batches = sum(r.stats["batches"] for r in runs)
        acked_batches = sum(r.stats["sent"] for r in runs) - nodes * args.processes  # inventory
        total_s = args.warmup + args.seconds
        acked_values = produced * acked_batches / max(batches, 1)
        cpu = [round(100 * r.cpu_s / r.window_s, 1) for r in runs]
        late = sum(r.stats["late_ticks"] for r in runs)
        wakeups = sum(r.stats["ticks"] for r in runs) / 10
        lagging = acked_batches < 0.99 * batches or any(r.stats["spooled"] for r in runs)
        behind = late > 0.02 * wakeups
        broker = _broker_cpu(settings)
        busy = sum(cpu) + (broker or 0.0)
        saturated = busy > 90 * (os.cpu_count() or 1)
        row = {"nodes": nodes * args.processes, "gpus": 8 * nodes * args.processes,
               "values_per_s": round(acked_values / total_s), "agent_cpu_pct": cpu,
               "late_wakeups": late, "acked_fraction": round(acked_batches / max(batches, 1), 4),
               "broker_cpu_pct": broker}
        rows.append(row)
        print(f"  {row['nodes']:4d} nodes ({row['gpus']} GPUs): {row['values_per_s']:>10,} "
              f"values/s acked, agent CPU {cpu}%, late wake-ups {late}, acked "
              f"{row['acked_fraction']:.2%}", flush=True)
        if behind or lagging:
            limited_by = ("agent CPU: the sampler falls behind its schedule" if behind else
                          "Kafka acknowledgements lag production (broker or producer)")
            break
        best = row
        if saturated:
            limited_by = (f"CPU: all {os.cpu_count()} cores busy (agents {sum(cpu):.0f}%, "
                          f"broker {broker or 0:.0f}%); more nodes would fall behind")
            break
    result = {"bench": "ingest", "values_per_s": best["values_per_s"] if best else 0,
              "nodes": best["nodes"] if best else 0, "gpus": best["gpus"] if best else 0,
              "processes": args.processes, "limited_by": limited_by, "steps": rows}
    return result


_BROKER_MARK: dict[int, tuple[float, float]] = {}


def _broker_cpu(settings: Settings) -> float | None:
    """CPU % of the local broker since the previous call (None if it is not ours)."""
    record = ManagedProcess("kafka", settings.run_dir, settings.logs_dir).record()
    try:
        times = psutil.Process(int(record["pid"])).cpu_times()
    except (TypeError, psutil.Error):
        return None
    now, cpu = time.monotonic(), times.user + times.system
    previous = _BROKER_MARK.get(0)
    _BROKER_MARK[0] = (cpu, now)
    if previous is None:
        return None
    return round(100 * (cpu - previous[0]) / (now - previous[1]), 1)
