"""`mlpe bench pipeline`: simulated nodes → Kafka → `mlpe stream` → InfluxDB.

Per step (a number of simulated nodes) it runs agent processes and stream workers
against the configured stack, watches the 1 s windows of one node per partition
(up to WATCHED: so every worker's share is measured, the busiest's included) appear in
InfluxDB and reports input values/s, lag from sample time to visibility (p50/p99 over
every sample of the watched windows) and CPU per component. It stops at the
first step whose p99 lag exceeds the target or whose windows go missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

from mlpe.common.kafka import forget_app, wait_stream_ready
from mlpe.common.process import ManagedProcess, stop_children
from mlpe.common.settings import Settings, environment

LAG_TARGET_S = 2.0
WATCHED = 8  # nodes whose windows are timed, each on a partition of its own
# How far back each poll looks: a window written later than this after its start counts
# as missing. Each poll's rows are parsed here, on the machine measured: 30 s of 64 GPUs'
# windows ten times a second was ~19,000 rows/s of influxdb-client's CSV parsing.
LOOK_BACK_S = 10


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="agents → Kafka → stream → InfluxDB: values/s and lag")
    p.add_argument("--nodes", default="8,32,64,96,128",
                   help="simulated nodes (8 GPUs each) per step, in order (8,32,64,96,128)")
    p.add_argument("--agents", type=int, default=1, help="agent processes (1)")
    p.add_argument("--workers", type=int, default=1, help="stream worker processes (1)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per step (20)")
    p.add_argument("--flush-ms", type=int, default=100,
                   help="agent flush interval: one message per node (all its GPUs) this "
                   "often (100 ms, the agent's default; longer = fewer, larger messages)")
    p.set_defaults(bench=bench_pipeline)


def _pid(settings: Settings, name: str) -> int | None:
    """The pid of a stack component `mlpe stack up` started (None if not ours)."""
    record = ManagedProcess(name, settings.run_dir, settings.logs_dir).record()
    return int(record["pid"]) if record else None


def _cpu(pid: int | None) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except (psutil.Error, TypeError, ValueError):
        return None


def _visible_windows(client, settings: Settings, nodes: list[str]) -> list[tuple]:
    """(node, gpu, window start ns, samples) of the nodes' 1 s windows now in InfluxDB that
    began in the last LOOK_BACK_S."""
    # A regex on the tag, not contains(): InfluxDB pushes that filter down to its storage;
    # contains() made it read every series of the bucket, 50 % of its CPU at 48 nodes.
    tables = client.query_api().query(f'''
        from(bucket: "{settings.influx_bucket_of('1s')}") |> range(start: -{LOOK_BACK_S}s)
          |> filter(fn: (r) => r._measurement == "gpu" and r.window == "1s"
                               and r.node =~ /^({"|".join(map(re.escape, nodes))})$/
                               and r._field == "samples")''')
    return [(r["node"], r["gpu"], int(r.get_time().timestamp() * 1e9), int(r.get_value()))
            for t in tables for r in t.records]


def _watched(prefix: str, agents: int, per_agent: int, partitions: int) -> list[str]:
    """One node per partition, as many as WATCHED: the agents' node ids, partitioned as
    the shipper's producer does (murmur2 of the key)."""
    from aiokafka.partitioner import murmur2

    found: dict[int, str] = {}
    for i in range(agents):
        for j in range(per_agent):
            node = f"{prefix}-{i}-{j:02d}"
            found.setdefault((murmur2(node.encode()) & 0x7FFFFFFF) % partitions, node)
    return [found[p] for p in sorted(found)][:WATCHED]


def _step(settings: Settings, nodes: int, args, workdir: Path) -> dict:
    from influxdb_client import InfluxDBClient

    from mlpe.common.tokens import influx_token

    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-{run_id}"
    # Start the workers at the end of the topics: only this step's data is measured.
    env = environment(MLPE_LOG_LEVEL="warning", MLPE_STREAM_APP_ID=f"bench-stream-{run_id}",
                      MLPE_STREAM_START="latest")
    workers = [subprocess.Popen([sys.executable, "-m", "mlpe.cli", "stream"], env=env,
                                stdout=(workdir / f"w{run_id}{i}.log").open("wb"),
                                stderr=subprocess.STDOUT) for i in range(args.workers)]
    wait_stream_ready(settings.kafka_bootstrap, f"bench-stream-{run_id}", args.workers,
                      workers)
    per_agent = -(-nodes // args.agents)
    agents = [subprocess.Popen(
        [sys.executable, "-m", "mlpe.cli", "agent", "--source", "sim", "--nodes",
         str(per_agent), "--node-id", f"{prefix}-{i}", "--duration", str(args.seconds),
         "--flush-ms", str(args.flush_ms),
         "--spool-dir", str(workdir / f"spool-{run_id}-{i}"),
         "--stats-json", str(workdir / f"a{run_id}{i}.json")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for i in range(args.agents)]
    watched = _watched(prefix, args.agents, per_agent, settings.gpu_metrics_partitions)
    cpu0 = {"stream": [_cpu(w.pid) for w in workers], "kafka": _cpu(_pid(settings, "kafka")),
            "influxdb": _cpu(_pid(settings, "influxdb")), "bench": _cpu(os.getpid())}
    seen: dict[tuple[str, str, int], float] = {}
    started = time.time()
    with InfluxDBClient(url=settings.influx_url, token=influx_token(settings),
                        org=settings.influx_org) as client:
        while time.time() < started + args.seconds + 6:
            now = time.time()
            for node, gpu, start_ns, samples in _visible_windows(client, settings, watched):
                if samples == 100:
                    seen.setdefault((node, gpu, start_ns), now)
            time.sleep(0.1)
        cpu1 = {"stream": [_cpu(w.pid) for w in workers],
                "kafka": _cpu(_pid(settings, "kafka")),
                "influxdb": _cpu(_pid(settings, "influxdb")), "bench": _cpu(os.getpid())}
        elapsed = time.time() - started
        for a in agents:
            a.wait()
    stop_children(workers, timeout=30)
    forget_app(settings.kafka_bootstrap, f"bench-stream-{run_id}")
    stats = [json.loads((workdir / f"a{run_id}{i}.json").read_text())
             for i in range(args.agents)]
    # Steady state only: a window ending after the agents stopped is closed by the idle
    # timeout (the node fell silent), which is a different figure (IDLE_S).
    last_sample_s = min(s["stopped_at"] for s in stats)
    steady = {k: v for k, v in seen.items() if k[2] / 1e9 + 1.0 <= last_sample_s - 1.0}
    lags = [visible - (start_ns + k * 10_000_000) / 1e9
            for (_, _, start_ns), visible in steady.items() for k in range(100)]
    expected_windows = 8 * len(watched) * max(int(args.seconds) - 3, 1)
    cpu = {name: (round(100 * (cpu1[name] - cpu0[name]) / elapsed, 1)
                  if cpu0[name] is not None and cpu1[name] is not None else None)
           for name in ("kafka", "influxdb", "bench")}
    cpu["stream"] = [round(100 * (b - a) / elapsed, 1) if a is not None and b is not None
                     else None for a, b in zip(cpu0["stream"], cpu1["stream"], strict=True)]
    cpu["agents"] = [round(100 * (s["cpu_at_stop"]) / args.seconds, 1) for s in stats]
    values_per_s = sum(s["values"] for s in stats) / args.seconds
    stream_cores = sum(c for c in cpu["stream"] if c is not None) / 100
    return {
        "nodes": per_agent * args.agents,
        "values_per_s": round(values_per_s),
        # What one core of stream worker turns into InfluxDB windows at this load.
        "values_per_s_per_stream_core": round(values_per_s / stream_cores)
        if stream_cores else None,
        "lag_p50_s": round(float(np.percentile(lags, 50)), 3) if lags else None,
        "lag_p99_s": round(float(np.percentile(lags, 99)), 3) if lags else None,
        "watched_nodes": len(watched),
        "windows_seen": len(steady),
        "windows_expected_at_least": expected_windows,
        "cpu_pct": cpu,
    }


def bench_pipeline(args, settings: Settings) -> dict:
    try:
        steps = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        raise SystemExit(f"mlpe bench pipeline: --nodes {args.nodes!r}: expected numbers "
                         "like 8,32,64") from None
    print(f"bench pipeline: {args.agents} agent process(es), {args.workers} stream worker(s), "
          f"{args.seconds:g} s per step", flush=True)
    best, limited_by, rows = None, "not reached: try more --nodes", []
    with tempfile.TemporaryDirectory(prefix="mlpe-bench-") as tmp:
        for nodes in steps:
            row = _step(settings, nodes, args, Path(tmp))
            rows.append(row)
            print(f"  {row['nodes']:4d} nodes: {row['values_per_s']:>9,} values/s in, lag p50 "
                  f"{row['lag_p50_s']} s / p99 {row['lag_p99_s']} s, windows "
                  f"{row['windows_seen']} (≥{row['windows_expected_at_least']}), CPU "
                  f"{row['cpu_pct']}", flush=True)
            if row["lag_p99_s"] is None or row["windows_seen"] < row["windows_expected_at_least"]:
                limited_by = "stream: windows did not all reach InfluxDB in time"
                break
            if row["lag_p99_s"] > LAG_TARGET_S:
                limited_by = f"lag p99 above {LAG_TARGET_S:g} s (stream CPU {row['cpu_pct']})"
                break
            best = row
    return {"bench": "pipeline", "values_per_s": best["values_per_s"] if best else 0,
            "lag_p50_s": best["lag_p50_s"] if best else None,
            "lag_p99_s": best["lag_p99_s"] if best else None,
            "nodes": best["nodes"] if best else 0, "limited_by": limited_by, "steps": rows}
