"""Trend detector: device memory growing steadily, i.e. a leak, with time to OOM.

The last MIN_POINTS, and the last WINDOW_S seconds, of 1 s means of memory used
are fitted with straight lines. Steady growth in either fires: a slope of at least
MIN_SLOPE MiB/s, a good fit (R² >= MIN_R2), most steps upward, and at least
MIN_GROWTH MiB in the window. A one-off jump (allocating a buffer, the caching
allocator growing at start-up) is not steady, so it does not fire. It resolves when
the slope falls below half.

State is a plain dict (stored in a Faust table); `step` is pure.
"""

from __future__ import annotations

import numpy as np

from mlpe.common.alerts import WARNING, build

WINDOW_S = 15.0
MIN_POINTS = 5
MIN_SLOPE = 16.0     # MiB/s
MIN_GROWTH = 256.0   # MiB over the window
MIN_R2 = 0.9
MIN_UP = 0.8         # fraction of point-to-point steps that grow


def fit(points: list[list[float]]) -> tuple[float, float, float, float]:
    """(slope MiB/s, R², fraction of steps upward, growth MiB) of [t_s, MiB] points: the
    least-squares line in closed form (np.polyfit's general solver cost 4 % of a stream
    worker, two fits per GPU per second)."""
    t, y = np.array(points).T
    dt, dy = t - t.mean(), y - y.mean()
    sxx, sxy, syy = float(dt @ dt), float(dt @ dy), float(dy @ dy)
    slope = sxy / sxx if sxx > 0 else 0.0
    # R² of a straight-line fit is the squared correlation of t and y.
    r2 = sxy * sxy / (sxx * syy) if sxx > 0 and syy > 0 else 0.0
    up = float((np.diff(y) > 0).mean())
    return slope, r2, up, float(y[-1] - y[0])


def step(state: dict | None, node: str, gpu: str, t_ns: int, used_mib: float,
         total_mib: float, now_ns: int) -> tuple[dict, list]:
    state = dict(state or {"points": [], "firing": False, "since": 0})
    if used_mib != used_mib:  # NaN: GPU not answering
        return state, []
    t_s = t_ns / 1e9
    points = [p for p in state["points"] if p[0] > t_s - WINDOW_S] + [[t_s, used_mib]]
    state["points"] = points
    if len(points) < MIN_POINTS:
        return state, []
    # A leak needs MIN_GROWTH within the points fitted: without it nothing can fire, and
    # only a firing alert needs the slope (to resolve). Most GPUs, most seconds.
    if not state["firing"] and used_mib - min(p[1] for p in points) < MIN_GROWTH:
        return state, []
    # The last few points find a fast leak soon after it starts; the whole window a slow one.
    fits = [fit(p) for p in (points[-MIN_POINTS:], points)[:1 + (len(points) > MIN_POINTS)]]
    leaking = any(slope >= MIN_SLOPE and r2 >= MIN_R2 and up >= MIN_UP and growth >= MIN_GROWTH
                  for slope, r2, up, growth in fits)
    slope, _r2, _up, growth = fits[-1] if len(fits) == 1 or not leaking else max(
        fits, key=lambda f: f[0])
    labels = {"node": node, "gpu": gpu, "field": "mem_used"}
    if leaking and not state["firing"]:
        state["firing"], state["since"] = True, int(points[0][0] * 1e9)
        left = max(total_mib - used_mib, 0.0) if total_mib == total_mib else float("nan")
        eta = f"out of memory in about {left / slope:.0f} s" if left == left else \
            "it will run out of memory"
        return state, [build(
            "trend", "gpu_memory_leak", WARNING, True, labels, slope, MIN_SLOPE,
            state["since"], now_ns, f"GPU {gpu} on {node}: memory leak, {slope:.0f} MiB/s",
            f"Device memory grew {growth:.0f} MiB "
            f"at a steady {slope:.0f} MiB/s (now {used_mib:.0f} MiB): {eta}.")]
    if state["firing"] and slope < MIN_SLOPE / 2:
        state["firing"] = False
        return state, [build(
            "trend", "gpu_memory_leak", WARNING, False, labels, slope, MIN_SLOPE,
            state["since"], now_ns, f"GPU {gpu} on {node}: memory no longer growing",
            f"Memory used is steady at {used_mib:.0f} MiB.")]
    return state, []
