"""AdviseJob: what a running job's telemetry says to change, each point with its figures.

`gather` reads the job's last `window_s` from InfluxDB (10 s aggregates of its GPUs — the
stream tags them with the job — of their nodes' hosts, of its training steps, and its
alerts); `recommend` turns that evidence into ranked recommendations. Pure functions of
the evidence, so the rules are unit-tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

THERMAL = 32 | 64           # SW / HW thermal slowdown bits of GPU_THROTTLE_REASONS
POWER = 4 | 128             # SW power cap / HW power brake
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


@dataclass
class Evidence:
    job_id: str
    window_s: int
    gpus: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # (node, gpu)
    hosts: dict[str, dict[str, float]] = field(default_factory=dict)             # node
    steps: dict[str, float] = field(default_factory=dict)  # tokens_per_s, step_time p50/max
    alerts: list[dict[str, str]] = field(default_factory=list)  # firing: rule, node, gpu, …


@dataclass
class Recommendation:
    title: str
    evidence: str
    severity: str = "info"
    expected_gain_pct: float = 0.0


def _flux_rows(query_api, org: str, flux: str) -> list[dict]:
    return [dict(r.values) for t in query_api.query(flux, org=org) for r in t.records]


def gather(settings, token: str, job_id: str, window_s: int) -> Evidence:
    from influxdb_client import InfluxDBClient

    ev = Evidence(job_id, window_s)
    bucket, job = settings.influx_bucket_of("10s"), job_id.replace('"', '\\"')
    head = f'from(bucket: "{bucket}") |> range(start: -{window_s}s)'
    with InfluxDBClient(url=settings.influx_url, token=token, org=settings.influx_org,
                        timeout=10_000) as client:
        q = client.query_api()
        gpu_fields = ("util_mean", "mem_used_mean", "mem_total_mean", "temp_max",
                      "power_mean", "power_limit_mean", "sm_clock_mean", "sm_clock_max_mean")
        field_set = " or ".join(f'r._field == "{f}"' for f in gpu_fields)
        for row in _flux_rows(q, settings.influx_org, f'''{head}
            |> filter(fn: (r) => r._measurement == "gpu" and r.window == "10s"
                                 and r.job == "{job}" and ({field_set}))
            |> group(columns: ["node", "gpu", "_field"]) |> mean()'''):
            ev.gpus.setdefault((row["node"], row["gpu"]), {})[row["_field"]] = row["_value"]
        for row in _flux_rows(q, settings.influx_org, f'''{head}
            |> filter(fn: (r) => r._measurement == "gpu" and r.window == "10s"
                                 and r.job == "{job}" and r._field == "throttle_reasons_max")
            |> group(columns: ["node", "gpu"]) |> max()'''):
            ev.gpus.setdefault((row["node"], row["gpu"]), {})["throttle"] = row["_value"]
        nodes = sorted({node for node, _ in ev.gpus})
        if nodes:
            node_set = " or ".join(f'r.node == "{n}"' for n in nodes)
            for row in _flux_rows(q, settings.influx_org, f'''{head}
                |> filter(fn: (r) => r._measurement == "host" and r.window == "10s"
                                     and r._field == "cpu_util_mean" and ({node_set}))
                |> group(columns: ["node"]) |> mean()'''):
                ev.hosts.setdefault(row["node"], {})["cpu_util"] = row["_value"]
        for name, fn in (("tokens_per_s_mean", "mean()"), ("step_time_s_mean", "median()"),
                         ("step_time_s_max", "max()")):
            for row in _flux_rows(q, settings.influx_org, f'''{head}
                |> filter(fn: (r) => r._measurement == "train" and r.window == "10s"
                                     and r.job == "{job}" and r._field == "{name}")
                |> group() |> {fn}'''):
                ev.steps[name] = row["_value"]
        for row in _flux_rows(q, settings.influx_org, f'''{head}
            |> filter(fn: (r) => r._measurement == "alert" and r.job == "{job}"
                                 and r._field == "state")
            |> group(columns: ["rule", "node", "gpu"]) |> last()'''):
            if row["_value"] == "firing":
                ev.alerts.append({k: str(row.get(k) or "") for k in ("rule", "node", "gpu")})
    return ev


def recommend(ev: Evidence, micro_batch_gain_pct: float | None = None,
              micro_batch: int | None = None) -> list[Recommendation]:
    """Ranked recommendations (critical first, then the largest expected gain)."""
    out: list[Recommendation] = []
    if not ev.gpus and not ev.steps:
        return [Recommendation(
            "No telemetry for this job", f"nothing from job {ev.job_id!r} in InfluxDB over "
            f"the last {ev.window_s} s: is it running, and are its agents and `mlpe stream` "
            "up?", "warning")]
    for node, host in sorted(ev.hosts.items()):
        utils = [g.get("util_mean", 100.0) for (n, _), g in ev.gpus.items() if n == node]
        if utils and host.get("cpu_util", 0) >= 85 and sum(utils) / len(utils) < 60:
            out.append(Recommendation(
                "Input-bound: raise DataLoader workers or pre-process the data",
                f"GPU util {sum(utils) / len(utils):.0f}% while the CPU is "
                f"{host['cpu_util']:.0f}% busy on {node}", "warning"))
    for (node, gpu), g in sorted(ev.gpus.items()):
        bits = int(g.get("throttle", 0))
        if bits & THERMAL:
            out.append(Recommendation(
                f"Thermal throttling on {node} GPU {gpu}: check its cooling",
                f"thermal slowdown reported (throttle bits {bits}); max temperature "
                f"{g.get('temp_max', float('nan')):.0f} °C; SM clock "
                f"{g.get('sm_clock_mean', 0):.0f} of {g.get('sm_clock_max_mean', 0):.0f} MHz",
                "critical"))
        elif bits & POWER:
            out.append(Recommendation(
                f"Power capping on {node} GPU {gpu}: check its power limit",
                f"power-cap slowdown reported (throttle bits {bits}); "
                f"{g.get('power_mean', 0):.0f} W of a {g.get('power_limit_mean', 0):.0f} W "
                "limit", "warning"))
    for alert in ev.alerts:
        rule, where = alert["rule"], " ".join(
            f"{k} {alert[k]}" for k in ("node", "gpu") if alert[k])
        if "straggler" in rule or "peer" in rule:
            out.append(Recommendation(
                f"Straggler: {where or 'one rank'} holds the job back — drain or replace it",
                f"alert {rule} firing", "critical"))
        elif rule in ("training_nan_loss", "training_loss_spike") or "loss" in rule:
            out.append(Recommendation(
                "Loss instability: lower the learning rate or tighten gradient clipping",
                f"alert {rule} firing", "critical"))
        elif rule not in ("job_restarted",):
            out.append(Recommendation(f"Alert {rule} on {where or 'the job'}",
                                      f"alert {rule} firing", "warning"))
    if ev.gpus:
        used = [g["mem_used_mean"] / g["mem_total_mean"] for g in ev.gpus.values()
                if g.get("mem_total_mean")]
        if used and max(used) < 0.5:
            free_gib = min(g["mem_total_mean"] - g["mem_used_mean"] for g in ev.gpus.values()
                           if g.get("mem_total_mean")) / 1024
            step = (f"micro-batch {micro_batch} → {2 * micro_batch} fits"
                    if micro_batch else "a larger micro-batch fits")
            gain = micro_batch_gain_pct or 0.0
            out.append(Recommendation(
                f"Memory headroom: {step}",
                f"{free_gib:.0f} GiB free on the fullest GPU ({max(used):.0%} used)"
                + (f"; predicted {gain:+.0f}% tokens/s" if gain else ""),
                "info", gain))
    p50, worst = ev.steps.get("step_time_s_mean"), ev.steps.get("step_time_s_max")
    if p50 and worst and worst > 1.5 * p50:
        out.append(Recommendation(
            "Uneven step times: look for stalls in data loading, checkpointing or the network",
            f"slowest 10 s window's step time {worst:.3f} s vs median {p50:.3f} s", "info"))
    if not out:
        out.append(Recommendation(
            "Nothing to change", f"{len(ev.gpus)} GPUs and the job's steps over "
            f"{ev.window_s} s: no throttling, straggler, input stall or memory headroom "
            "found", "info"))
    out.sort(key=lambda r: (SEVERITY_ORDER.get(r.severity, 3), -r.expected_gain_pct))
    return out
