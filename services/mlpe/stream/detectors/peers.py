"""Cross-peer detector: one GPU, or one node, falling behind the rest of its group.

Every second each GPU's 1 s means of utilization, SM clock and NVLink traffic are
compared with its group (the GPUs that report together: one job's fleet). The
reference is the group's 75th percentile, so it stays healthy while up to a
quarter of the group, or a whole node of two, is not. A member more than a
tolerance below it is deviant; HOLD deviant seconds in a row fire, CLEAR normal
ones resolve. When everyone slows down together (warm-up, a checkpoint or
evaluation pause, idle between epochs) the reference falls with them and nothing
fires; below an activity floor nothing is compared at all.

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
                  "its links carry far less than its peers': a degraded or failing link"),
}
LABELS = {"util": "utilization", "sm_clock": "SM clock", "nvlink_tx": "NVLink traffic"}
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


def _deviants(members: dict[str, dict[str, float]]) -> dict[tuple[str, str], tuple]:
    """{(member or node, field): (value, reference, threshold, group size)} for this second."""
    out = {}
    for name, (rel, absolute, floor, *_rest) in FIELDS.items():
        values = {m: v[name] for m, v in members.items()
                  if v.get(name) is not None and v[name] == v[name]}
        if len(values) < MIN_MEMBERS:
            continue
        reference = float(np.percentile(list(values.values()), 75))
        if reference < floor:
            continue  # the whole group is idle: nothing to compare
        threshold = min(reference * (1 - rel), reference - absolute)
        low = {m: x for m, x in values.items() if x < threshold}
        by_node: dict[str, list[str]] = {}
        for m in values:
            by_node.setdefault(m.split("/")[0], []).append(m)
        for node, node_members in by_node.items():
            flagged = [m for m in node_members if m in low]
            if len(flagged) >= max(2, NODE_SHARE * len(node_members)):
                mean = float(np.mean([values[m] for m in node_members]))
                out[(node, name)] = (mean, reference, threshold, len(values))
            else:
                out.update({(m, name): (low[m], reference, threshold, len(values))
                            for m in flagged})
    slow_nodes = {key[0].split("/")[0] for key in out if key[1] == "sm_clock" and "/" in key[0]}
    return {key: v for key, v in out.items()
            if not (key[1] == "util" and key[0].split("/")[0] in slow_nodes)}


def evaluate(state: dict | None, start_ns: int, members: dict[str, dict[str, float]],
             now_ns: int | None = None) -> tuple[dict, list]:
    """Judge one second of one group; returns (new state, alerts)."""
    now_ns = now_ns or time.time_ns()
    state = {"last_start": 0, "conditions": {}, **(state or {})}
    conditions = {k: dict(v) for k, v in state["conditions"].items()}
    alerts = []
    deviants = _deviants(members)
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
    state.update(last_start=start_ns, conditions=conditions, usual=usual, usual_at=usual_at)
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
