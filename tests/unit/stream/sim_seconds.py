"""The GPU simulator's output as the stream's 1 s means, for detector tests."""

from __future__ import annotations

import numpy as np

from mlpe.agent.scenario import Fault, IdleGap, Scenario
from mlpe.agent.sources.sim import SimulatedGpus
from mlpe.common.batches import field_name

HZ = 50
T0_NS = 1_800_000_000 * 10**9


def scenario(*faults: tuple, gaps: tuple = (), nodes: int = 2, seed: int = 3,
             step_time_s: float = 0.5) -> Scenario:
    """faults as (kind, node, gpu or None, at_s, for_s or None[, magnitude]); gaps as
    (at_s, for_s[, kind])."""
    from mlpe.agent.scenario import FAULT_KINDS

    return Scenario(seed=seed, nodes=nodes, warmup_s=10.0, step_time_s=step_time_s,
                    idle_gaps=tuple(IdleGap(*g) for g in gaps),
                    faults=tuple(Fault(kind, node, gpu, at, dur,
                                       rest[0] if rest else FAULT_KINDS[kind][0])
                                 for kind, node, gpu, at, dur, *rest in faults))


def seconds(s: Scenario, duration_s: int):
    """Yield (start_ns, {node: {gpu: {field: 1 s mean}}}) for each simulated second."""
    sim = SimulatedGpus(s, HZ)
    names = [field_name(f) for f in sim.fields]
    for second in range(duration_s):
        k0 = second * HZ
        times = T0_NS + (k0 + np.arange(HZ)) * (10**9 // HZ)
        values, _events = sim.read_block(k0, times)
        with np.errstate(all="ignore"):
            means = np.nanmean(values, axis=0)  # (devices, fields); NaN for a lost GPU
        report: dict[str, dict[str, dict[str, float]]] = {}
        for row, device in enumerate(sim.devices):
            report.setdefault(device.node_id, {})[str(device.index)] = dict(
                zip(names, map(float, means[row]), strict=True))
        yield T0_NS + second * 10**9, report
