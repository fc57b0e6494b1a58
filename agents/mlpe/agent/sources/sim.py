"""Simulated GPUs: a training rhythm, warm-up and idle gaps, and injectable faults.

All GPUs of all simulated nodes are one numpy vector, so a tick costs a few
dozen array operations however many GPUs there are. The model runs on sample
index k (time k/hz), not wall time, so a seed gives the same series every run.
"""

from __future__ import annotations

import uuid

import numpy as np

from mlpe.agent.scenario import Scenario
from mlpe.agent.sources.base import Device, Reading
from mlpe.common.batches import GPU_FIELDS
from mlpe.v1 import metrics_pb2 as pb

F = pb.Field
COL = {number: i for i, number in enumerate(GPU_FIELDS)}

# An H100 SXM, roughly: clocks in MHz, power in W, memory in MiB.
SM_CLOCK_MAX, SM_CLOCK_IDLE, MEM_CLOCK = 1980.0, 345.0, 2619.0
POWER_IDLE, POWER_MAX = 70.0, 700.0
MEM_TOTAL, MEM_TRAINING = 81559.0, 62000.0
NVLINK_COMM_MBPS, PCIE_LOAD_MBPS = 150_000.0, 3_000.0
TEMP_AMBIENT, TEMP_PER_W, TEMP_TAU_S = 28.0, 0.06, 15.0


class SimulatedGpus:
    name = "sim"

    def __init__(self, scenario: Scenario, hz: float, node_prefix: str = "sim-node-"):
        self.s = scenario
        self.hz = hz
        self.fields = GPU_FIELDS
        n_nodes, per_node = scenario.nodes, scenario.gpus_per_node
        self.n = n_nodes * per_node
        self.node_of = np.repeat(np.arange(n_nodes), per_node)
        self.gpu_of = np.tile(np.arange(per_node), n_nodes)
        self.devices = [
            Device(node_id=f"{node_prefix}{node:02d}", kind=pb.DEVICE_KIND_GPU, index=gpu,
                   uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_OID, f'{scenario.seed}/{node}/{gpu}')}")
            for node, gpu in zip(self.node_of, self.gpu_of, strict=True)
        ]
        self.rng = np.random.default_rng(scenario.seed)
        # Nodes drift slightly apart in phase, as real data-parallel ranks do.
        self.phase_offset = self.rng.uniform(0, 0.02, n_nodes)[self.node_of]
        self.mem_base = MEM_TRAINING + self.rng.uniform(-500, 500, self.n)
        self.temp = np.full(self.n, TEMP_AMBIENT + 10.0)
        self.energy = self.rng.uniform(1e6, 5e6, self.n)
        self.ecc_uncorrected = np.zeros(self.n)
        self.leaked = np.zeros(self.n)
        self.throttle = np.zeros(self.n, dtype=np.int64)
        self.lost = np.zeros(self.n, dtype=bool)
        self._fault_masks = [(f, self._mask(f)) for f in scenario.faults]

    def _mask(self, fault) -> np.ndarray:
        mask = self.node_of == fault.node
        if fault.gpu is not None:
            mask &= self.gpu_of == fault.gpu
        return mask

    def inventory(self) -> list[pb.GpuInfo]:
        per_node = self.s.gpus_per_node
        out = []
        for d in self.devices[:per_node]:  # every simulated node looks the same
            links = [pb.NvLink(link=j, peer_gpu_index=p, active=True, peer_pci_bus_id=f"sim:{p}")
                     for j, p in enumerate(q for q in range(per_node) if q != d.index)]
            out.append(pb.GpuInfo(index=d.index, uuid=d.uuid, name=self.s.gpu_model,
                                  memory_total_mib=int(MEM_TOTAL), power_limit_w=POWER_MAX,
                                  sm_clock_max_mhz=int(SM_CLOCK_MAX), nvlinks=links,
                                  pci_bus_id=f"sim:{d.index}"))
        return out

    def read(self, k: int, t_ns: int) -> Reading:
        s, dt, t = self.s, 1.0 / self.hz, k / self.hz
        phase = ((t / s.step_time_s) + self.phase_offset) % 1.0
        computing = phase < s.compute_fraction
        util = np.where(computing, 97.0, 30.0)
        if t < s.warmup_s:
            util = util * (0.2 + 0.8 * t / max(s.warmup_s, 1e-9))
        if any(gap.at_s <= t < gap.at_s + gap.for_s for gap in s.idle_gaps):
            util = np.zeros(self.n)
        clock = np.ones(self.n)
        limit = np.full(self.n, POWER_MAX)
        link = np.ones(self.n)
        heat = np.zeros(self.n)
        throttle = np.zeros(self.n, dtype=np.int64)
        events: list[tuple[int, pb.DeviceEvent]] = []
        onset = round(t * self.hz)

        for fault, mask in self._fault_masks:
            starts_now = k == round(fault.at_s * self.hz)
            if fault.kind == "xid" and starts_now:
                events += [(i, pb.DeviceEvent(time_ns=t_ns, kind=pb.EVENT_XID,
                                              code=int(fault.magnitude),
                                              detail=f"Xid {int(fault.magnitude)} (simulated)"))
                           for i in np.flatnonzero(mask)]
            elif fault.kind == "ecc_error" and starts_now:
                self.ecc_uncorrected[mask] += fault.magnitude
                events += [(i, pb.DeviceEvent(time_ns=t_ns, kind=pb.EVENT_ECC_UNCORRECTED,
                                              code=int(fault.magnitude),
                                              detail="uncorrected ECC error (simulated)"))
                           for i in np.flatnonzero(mask)]
            if not fault.active(t):
                if fault.kind == "gpu_lost" and fault.for_s is not None and \
                        onset == round((fault.at_s + fault.for_s) * self.hz):
                    self.lost[mask] = False
                    events += [(i, pb.DeviceEvent(time_ns=t_ns, kind=pb.EVENT_GPU_RECOVERED,
                                                  detail="GPU answers again (simulated)"))
                               for i in np.flatnonzero(mask)]
                continue
            m = fault.magnitude
            if fault.kind == "thermal_throttle":
                clock[mask] *= 1.0 - m
                heat[mask] += 18.0
                throttle[mask] |= pb.THROTTLE_HW_THERMAL | pb.THROTTLE_SW_THERMAL
            elif fault.kind == "power_cap":
                limit[mask] = POWER_MAX * m
            elif fault.kind == "memory_leak":
                self.leaked[mask] += m * dt
            elif fault.kind == "input_starvation":
                util[mask] *= m
            elif fault.kind == "straggler":
                clock[mask] *= 1.0 - m
                # Its peers finish first and wait for it in the collective.
                peers = (self.node_of[:, None] == self.node_of[mask][None, :]).any(axis=1)
                peers &= ~mask
                util[peers] *= 1.0 - m
            elif fault.kind == "link_degradation":
                link[mask] *= 1.0 - m
            elif fault.kind == "stall":
                util[mask] = 0.0
                link[mask] = 0.0
            elif fault.kind == "gpu_lost" and starts_now:
                self.lost[mask] = True
                events += [(i, pb.DeviceEvent(time_ns=t_ns, kind=pb.EVENT_GPU_LOST, code=15,
                                              detail="GPU fell off the bus (simulated)"))
                           for i in np.flatnonzero(mask)]

        noise = self.rng.standard_normal((3, self.n))
        util = np.clip(util * (1.0 + 0.015 * noise[0]), 0.0, 100.0)
        wanted = POWER_IDLE + (POWER_MAX - POWER_IDLE) * util / 100.0 * (0.35 + 0.65 * clock)
        capped = wanted > limit
        clock = np.where(capped, clock * limit / wanted, clock)
        throttle[capped] |= pb.THROTTLE_SW_POWER_CAP
        power = np.minimum(wanted, limit) + 3.0 * noise[1]
        idle = util < 1.0
        throttle[idle] |= pb.THROTTLE_GPU_IDLE
        self.temp += (TEMP_AMBIENT + TEMP_PER_W * power + heat - self.temp) * dt / TEMP_TAU_S
        self.energy += power * dt
        comm = (~computing) & ~idle

        out = np.empty((self.n, len(self.fields)))
        out[:, COL[F.GPU_UTIL]] = util
        out[:, COL[F.GPU_MEM_UTIL]] = util * 0.55
        out[:, COL[F.GPU_MEM_USED]] = np.minimum(self.mem_base + self.leaked, MEM_TOTAL)
        out[:, COL[F.GPU_MEM_TOTAL]] = MEM_TOTAL
        out[:, COL[F.GPU_POWER]] = power
        out[:, COL[F.GPU_ENERGY]] = self.energy
        out[:, COL[F.GPU_TEMP]] = self.temp + 0.2 * noise[2]
        out[:, COL[F.GPU_MEM_TEMP]] = self.temp + 6.0
        out[:, COL[F.GPU_SM_CLOCK]] = np.where(idle, SM_CLOCK_IDLE, SM_CLOCK_MAX * clock)
        out[:, COL[F.GPU_MEM_CLOCK]] = MEM_CLOCK
        out[:, COL[F.GPU_THROTTLE_REASONS]] = throttle
        out[:, COL[F.GPU_PCIE_TX]] = np.where(idle, 0.0, 400.0) * link
        out[:, COL[F.GPU_PCIE_RX]] = np.where(computing & ~idle, PCIE_LOAD_MBPS, 200.0) * link
        out[:, COL[F.GPU_NVLINK_TX]] = np.where(comm, NVLINK_COMM_MBPS, 0.0) * link
        out[:, COL[F.GPU_NVLINK_RX]] = out[:, COL[F.GPU_NVLINK_TX]]
        out[:, COL[F.GPU_ECC_CORRECTED]] = 0.0
        out[:, COL[F.GPU_ECC_UNCORRECTED]] = self.ecc_uncorrected
        out[:, COL[F.GPU_POWER_LIMIT]] = limit
        out[:, COL[F.GPU_SM_CLOCK_MAX]] = SM_CLOCK_MAX
        out[self.lost] = np.nan

        changed = np.flatnonzero((throttle != self.throttle) & ~self.lost)
        events += [(i, pb.DeviceEvent(time_ns=t_ns, kind=pb.EVENT_THROTTLE, code=int(throttle[i]),
                                      detail=f"throttle reasons now {int(throttle[i]):#x}"))
                   for i in changed]
        self.throttle = throttle
        return Reading(values=out, events=events)
