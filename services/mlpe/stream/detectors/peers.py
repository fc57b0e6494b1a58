"""Cross-peer detector: one GPU, or one node, falling behind the rest of its group.

Every second each GPU's 1 s means of utilization, SM clock, NVLink and PCIe traffic
are compared with its group (the GPUs that report together: one job's fleet). The
reference is the group's 75th percentile, so it stays healthy while up to a
quarter of the group, or a whole node of two, is not. A member more than a
tolerance below it is deviant; HOLD deviant seconds in a row fire, CLEAR normal
ones resolve. When everyone slows down together (warm-up, a checkpoint or
evaluation pause, idle between epochs) the reference falls with them and nothing
fires; below an activity floor nothing is compared at all.

Subtle faults need a second look: a straggler 10 % slower than its peers, or a node
whose links lost 30 % of their bandwidth, are within the noise of one second (GPUs
differ by ~2 % in sustained clock; a second holds a varying share of communication).
For SUSTAINED fields each member's running mean over the last seconds is compared
with the group's 75th percentile of the same running means, with a tight tolerance.

Two refinements keep one incident one alert: if most GPUs of a node deviate on a
field, that is a node-level alert instead of eight; and GPUs idling because a
node-mate is slow (a straggler: its peers wait for it in the collective) are not
flagged for low utilization when that node-mate is flagged for a low SM clock.

`Buckets` gathers the per-node reports of one second; `evaluate` is pure, its
state a plain dict (stored in a Faust table).
"""

from __future__ import annotations

import time

import numpy as np

from mlpe.common.alerts import CRITICAL, WARNING, build

# field: (relative tolerance, absolute tolerance, activity floor of the reference, unit,
#         severity, what it means)
FIELDS = {
    "util": (0.25, 10.0, 30.0, "%", WARNING,
             "it is starved (input pipeline, host) or stalled while its peers work"),
    "sm_clock": (0.15, 150.0, 1000.0, "MHz", WARNING,
                 "it computes slower than its peers and the whole job runs at its pace"),
    "nvlink_tx": (0.5, 1000.0, 1000.0, "MB/s", WARNING,
                  "its links carry less than its peers': a degraded or failing link"),
    "pcie_rx": (0.5, 500.0, 500.0, "MB/s", WARNING,
                "its PCIe link carries less than its peers': a degraded link or slot"),
}
LABELS = {"util": "utilization", "sm_clock": "SM clock", "nvlink_tx": "NVLink traffic",
          "pcie_rx": "PCIe traffic"}
# Fields also judged on running means: (relative, absolute tolerance). A straggler 10 %
# slower, or a node whose links lost 30 %, is within one second's noise of its peers;
# over a few seconds it is not. GPUs of one model differ by ~2 % in sustained clock.
SUSTAINED = {"sm_clock": (0.06, 60.0), "nvlink_tx": (0.15, 500.0), "pcie_rx": (0.15, 200.0)}
SMOOTH_ALPHA = 0.3    # per second: a step change shows in full within ~5 s
SMOOTH_MIN = 3        # seconds of running mean before a member is judged on it
MIN_MEMBERS = 4
HOLD, CLEAR = 2, 3
NODE_SHARE = 0.5      # this share of a node's GPUs (two at least) deviating = a node alert
MAX_WAIT_S = 2.0      # evaluate a second once a report this much newer has arrived
FORGET_S = 10.0       # a member silent this long is no longer expected
THIN_SHARE = 0.75     # fewer members than this share of the usual group: no recovery judged


class Buckets:
    """Reports of one second from every node; ready when all expected members are in,
    or when reports MAX_WAIT_S newer have arrived (a node that stopped reporting)."""

    def __init__(self):
        self.pending: dict[int, dict[str, dict[str, float]]] = {}
        self.last_seen: dict[str, int] = {}   # member -> start_ns of its newest report

    def add(self, report: dict) -> None:
        start = int(report["start_ns"])
        bucket = self.pending.setdefault(start, {})
        for gpu, values in report["gpus"].items():
            member = f"{report['node']}/{gpu}"
            bucket[member] = values
            self.last_seen[member] = max(self.last_seen.get(member, 0), start)

    def ready(self, after_ns: int) -> list[tuple[int, dict]]:
        """Complete buckets (oldest first); buckets at or before `after_ns` are dropped
        (already evaluated: a replay after a crash)."""
        if not self.pending:
            return []
        newest = max(self.pending)
        out = []
        for start in sorted(self.pending):
            if start <= after_ns:
                del self.pending[start]
                continue
            expected = {m for m, seen in self.last_seen.items()
                        if seen >= start - FORGET_S * 1e9}
            if expected <= set(self.pending[start]) or newest - start >= MAX_WAIT_S * 1e9:
                out.append((start, self.pending.pop(start)))
            else:
                break  # keep order: a later second never goes before an earlier one
        return out


def _flag(values: dict[str, float], reference: float, rel: float, absolute: float,
          name: str, out: dict) -> None:
    """Members below the reference by more than the tolerance into `out`, as one node
    entry when most of a node's GPUs are at least half as far below: a node-wide fault
    near the tolerance puts some of its GPUs past it and some not, and is one incident."""
    threshold = min(reference * (1 - rel), reference - absolute)
    near = min(reference * (1 - rel / 2), reference - absolute / 2)
    low = {m: x for m, x in values.items() if x < threshold}
    by_node: dict[str, list[str]] = {}
    for m in values:
        by_node.setdefault(m.split("/")[0], []).append(m)
    for node, node_members in by_node.items():
        flagged = [m for m in node_members if m in low]
        if flagged and sum(values[m] < near for m in node_members) >= max(
                2, NODE_SHARE * len(node_members)):
            mean = float(np.mean([values[m] for m in node_members]))
            out.setdefault((node, name), (mean, reference, threshold, len(values)))
        else:
            for m in flagged:
                out.setdefault((m, name), (low[m], reference, threshold, len(values)))


def _finite(members: dict[str, dict[str, float]], name: str) -> dict[str, float]:
    return {m: v[name] for m, v in members.items()
            if v.get(name) is not None and v[name] == v[name]}


def _deviants(members: dict[str, dict[str, float]], smooth: dict | None = None,
              start_ns: int = 0) -> dict[tuple[str, str], tuple]:
    """{(member or node, field): (value, reference, threshold, group size)} for this second:
    far below the group this second, or (fields of SUSTAINED) a little below it over the
    last seconds. `smooth` (the group state's running means) is updated in place."""
    out: dict[tuple[str, str], tuple] = {}
    smooth = {} if smooth is None else smooth
    for name, (rel, absolute, floor, *_rest) in FIELDS.items():
        values = _finite(members, name)
        if len(values) < MIN_MEMBERS:
            continue
        reference = float(np.percentile(list(values.values()), 75))
        if reference < floor:
            continue  # the whole group is idle: nothing to compare
        _flag(values, reference, rel, absolute, name, out)
        if name in SUSTAINED:
            _sustained(values, smooth.setdefault(name, {}), start_ns, name, out)
    slow_nodes = {key[0].split("/")[0] for key in out if key[1] == "sm_clock" and "/" in key[0]}
    return {key: v for key, v in out.items()
            if not (key[1] == "util" and key[0].split("/")[0] in slow_nodes)}


def _sustained(values: dict[str, float], field_state: dict, start_ns: int, name: str,
               out: dict) -> None:
    """Running means (EWMA, SMOOTH_ALPHA per active second) of each member, judged against
    the group's 75th percentile of them: a few percent below, held over seconds, stands
    out of the noise of one second (sampling phase, jitter) that a tight per-second
    tolerance would alarm on. Every member is fed the same seconds, so the group moving
    together (warm-up, eval, a pause) moves every running mean alike.

    A second a member did not report (its node's report came too late under load) is
    filled with the group's median of that second: left out, or restarted from its next
    value, its mean would be out of step with the others' (2 s steps: a mean restarted
    in a compute second is half its peers' NVLink) and a healthy node was called 28 %
    low. A member new to the group (or back after FORGET_S) joins it in step: from the
    group's median running mean and count, not from one second's value (which would
    take ~10 s to settle, and set it apart from peers that started with a warm-up
    second); a faulty one still shows half its deviation after two seconds."""
    means = {m: v for m, v in field_state.items()
             if m != "_at"  # written by earlier versions: kept tables may hold it
             and start_ns - v[2] <= FORGET_S * 1e9}
    joined = None
    if means:
        joined = (float(np.median([v[0] for v in means.values()])),
                  max(v[1] for v in means.values()))
    median = float(np.median(list(values.values())))
    for m in means.keys() - values.keys():
        mean, n, seen = means[m]
        means[m] = [mean + SMOOTH_ALPHA * (median - mean), n + 1, seen]
    for m, x in values.items():
        mean, n = means[m][:2] if m in means else joined or (x, 0)
        means[m] = [x if n == 0 else mean + SMOOTH_ALPHA * (x - mean), n + 1, start_ns]
    field_state.clear()
    field_state.update(means)
    ready = {m: v[0] for m, v in means.items() if v[1] >= SMOOTH_MIN and v[2] == start_ns}
    if len(ready) < MIN_MEMBERS:
        return
    rel, absolute = SUSTAINED[name]
    _flag(ready, float(np.percentile(list(ready.values()), 75)), rel, absolute, name, out)


def evaluate(state: dict | None, start_ns: int, members: dict[str, dict[str, float]],
             now_ns: int | None = None) -> tuple[dict, list]:
    """Judge one second of one group; returns (new state, alerts)."""
    now_ns = now_ns or time.time_ns()
    state = {"last_start": 0, "conditions": {}, **(state or {})}
    conditions = {k: dict(v) for k, v in state["conditions"].items()}
    alerts = []
    smooth = {f: dict(v) for f, v in (state.get("smooth") or {}).items()}
    deviants = _deviants(members, smooth, start_ns)
    for (who, name), (value, reference, threshold, size) in deviants.items():
        key = f"{who}|{name}"
        c = conditions.setdefault(key, {"bad": 0, "good": 0, "since": start_ns,
                                        "firing": False, "seen": start_ns})
        c["bad"], c["good"] = c["bad"] + 1, 0
        if c["bad"] >= HOLD and not c["firing"]:
            c["firing"] = True
            alerts.append(_alert(who, name, True, value, reference, threshold, size,
                                 c["since"], now_ns))
    reported = {m for m, v in members.items()
                if any(v.get(f) is not None and v[f] == v[f] for f in FIELDS)}
    reported_nodes = {m.split("/")[0] for m in reported}
    # A second with far fewer members than usual (after a restart, partitions catch up
    # one by one) compares a GPU with a few peers only: not enough to call it recovered.
    usual, usual_at = state.get("usual", 0), state.get("usual_at", 0)
    if len(reported) >= usual or start_ns - usual_at > FORGET_S * 1e9:
        usual, usual_at = len(reported), start_ns
    thin = len(reported) < THIN_SHARE * usual
    for key, c in list(conditions.items()):
        who, name = key.rsplit("|", 1)
        if (who, name) in deviants:
            c["seen"] = start_ns
            continue
        # No data for it this second (a replay after a restart, a late report) is not a
        # recovery; only silence longer than FORGET_S clears it.
        silent = who not in reported and who not in reported_nodes
        if (silent or thin) and start_ns - c.get("seen", c["since"]) <= FORGET_S * 1e9:
            continue
        c["bad"], c["good"] = 0, c["good"] + 1
        if c["firing"] and c["good"] >= CLEAR:
            alerts.append(_alert(who, name, False, float("nan"), 0.0, 0.0, 0, c["since"],
                                 now_ns))
            del conditions[key]
        elif not c["firing"]:
            del conditions[key]
    state.update(last_start=start_ns, conditions=conditions, usual=usual, usual_at=usual_at,
                 smooth=smooth)
    return state, alerts


def _alert(who: str, name: str, firing: bool, value: float, reference: float,
           threshold: float, size: int, since_ns: int, now_ns: int):
    rel, _absolute, _floor, unit, severity, why = FIELDS[name]
    node, _, gpu = who.partition("/")
    labels = {"node": node, "field": name} | ({"gpu": gpu} if gpu else {})
    subject = f"GPU {gpu} on {node}" if gpu else f"Node {node} (most of its GPUs)"
    label = LABELS[name]
    if not firing:
        return build("peer", f"peer_low_{name}", severity, False, labels, value, threshold,
                     since_ns, now_ns, f"{subject}: {label} back in line with its peers",
                     f"{label} is within {rel:.0%} of its peers again.")
    below = 1 - value / reference if reference else 0.0
    return build(
        "peer", f"peer_low_{name}", CRITICAL if below > 0.9 else severity, True, labels, value,
        threshold, since_ns, now_ns, f"{subject}: {label} {below:.0%} below its peers",
        f"{label} {value:.0f} {unit} against {reference:.0f} {unit} for its peers "
        f"(75th percentile of {size} GPUs): {why}.")
