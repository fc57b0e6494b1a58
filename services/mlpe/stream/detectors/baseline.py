"""Statistical detector: a robust baseline per GPU series, for spikes and drifts upward.

Each watched field keeps an exponentially weighted mean and mean absolute deviation
of its 1 s means (memory about two minutes). A point above mean + max(K x deviation,
a floor in the field's unit) is abnormal; HOLD abnormal points in a row fire, CLEAR
normal ones resolve. Points outside the band on either side are not learned, so a
drift stays visible instead of becoming the new normal (until REBASE points in a
row say it is one). Temperature lags load by a minute, so only steady state counts:
a second is learned or judged only after SETTLE_S busy seconds in a row (utilization
at least BUSY_UTIL), and nothing is judged before WARMUP such seconds. The job
starting, a pause and the climb back after it are therefore neither learned nor
judged: the baseline is "how hot this GPU runs when it has been working a while".
Temperatures only: they have no benign reason to jump.

State is a plain dict (stored in a Faust table); `step` is pure.
"""

from __future__ import annotations

from mlpe.common.alerts import CRITICAL, WARNING, build

WATCHED = {  # field: (floor above baseline, unit, severity, why it matters)
    "temp": (5.0, "°C", WARNING, "cooling is failing or the GPU works harder than its peers; "
             "thermal throttling follows"),
    "mem_temp": (5.0, "°C", WARNING, "HBM is heating up; memory errors and throttling follow"),
}
ALPHA = 1 / 120
K = 5.0
WARMUP, HOLD, CLEAR = 30, 2, 3
SETTLE_S = 60     # busy seconds in a row before temperature is steady (4 thermal time constants)
REBASE = 600      # abnormal points in a row after which the new level is the baseline
BUSY_UTIL = 50.0  # % utilization: only busy seconds are learned and judged


def step(state: dict | None, node: str, gpu: str, t_ns: int, values: dict[str, float],
         now_ns: int) -> tuple[dict, list]:
    """Feed one 1 s point per watched field; returns (new state, alerts)."""
    state = dict(state or {})
    alerts = []
    busy = values.get("util", 0.0) >= BUSY_UTIL
    state["busy_s"] = state.get("busy_s", 0) + 1 if busy else 0
    if state["busy_s"] <= SETTLE_S:
        return state, alerts  # idle, or still heating up after a pause: not steady state
    for name, (floor, unit, severity, why) in WATCHED.items():
        x = values.get(name)
        if x is None or x != x:  # missing or NaN (GPU lost): nothing to learn or judge
            continue
        s = dict(state.get(name) or {"n": 0, "mean": x, "dev": 0.0, "bad": 0, "good": 0,
                                     "since": 0, "firing": False})
        band = max(K * s["dev"], floor)
        limit = s["mean"] + band
        abnormal = s["n"] >= WARMUP and x > limit
        if abnormal and s["bad"] >= REBASE:  # a lasting new level (another job): accept it
            s.update(mean=x, dev=0.0, n=WARMUP, bad=0)
            abnormal = False
        if abnormal:
            s["bad"], s["good"] = s["bad"] + 1, 0
            s["since"] = s["since"] or t_ns
        else:
            s["bad"], s["good"] = 0, s["good"] + 1
            if s["n"] < WARMUP:  # a plain average of the first points
                s["dev"] += (abs(x - s["mean"]) - s["dev"]) / (s["n"] + 1)
                s["mean"] += (x - s["mean"]) / (s["n"] + 1)
            elif x >= s["mean"] - band:  # far below is not learned either
                s["dev"] += ALPHA * (abs(x - s["mean"]) - s["dev"])
                s["mean"] += ALPHA * (x - s["mean"])
            s["n"] += 1
        labels = {"node": node, "gpu": gpu, "field": name}
        rule = f"gpu_{name}_above_baseline"
        if abnormal and s["bad"] >= HOLD and not s["firing"]:
            s["firing"] = True
            alerts.append(build(
                "statistical", rule, CRITICAL if x > limit + 2 * floor else severity, True,
                labels, x, limit, s["since"], now_ns,
                f"GPU {gpu} on {node}: {name.replace('_', ' ')} {x - s['mean']:+.0f} {unit} "
                "above its baseline",
                f"{name.replace('_', ' ')} is {x:.1f} {unit}, {x - s['mean']:.1f} {unit} above "
                f"its usual {s['mean']:.1f} {unit} (limit {limit:.1f}): {why}."))
        elif s["firing"] and s["good"] >= CLEAR:
            alerts.append(build(
                "statistical", rule, severity, False, labels, x, limit, s["since"], now_ns,
                f"GPU {gpu} on {node}: {name.replace('_', ' ')} back to normal",
                f"{name.replace('_', ' ')} is {x:.1f} {unit}, within its baseline again."))
            s["firing"], s["since"] = False, 0
        if not abnormal and not s["firing"]:
            s["since"] = 0
        state[name] = s
    return state, alerts
