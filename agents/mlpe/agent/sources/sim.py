"""Simulated GPUs: a training rhythm, warm-up and idle gaps, and injectable faults.

All GPUs of all simulated nodes are one numpy vector, so a tick costs a few
dozen array operations however many GPUs there are. The model runs on sample
index k (time k/hz), not wall time, so a seed gives the same series every run.
"""

from __future__ import annotations

import socket
import uuid

import numpy as np

from mlpe.agent.scenario import Scenario
from mlpe.agent.sources.base import Device, Reading
from mlpe.common.batches import GPU_FIELDS
from mlpe.v1 import metrics_pb2 as pb

F = pb.Field
COL = {number: i for i, number in enumerate(GPU_FIELDS)}
# Plain ints, looked up once: protobuf enum attribute access is slow in a hot loop.
(C_UTIL, C_MEM_UTIL, C_MEM_USED, C_MEM_TOTAL, C_POWER, C_ENERGY, C_TEMP, C_MEM_TEMP, C_SM_CLOCK,
 C_MEM_CLOCK, C_THROTTLE, C_PCIE_TX, C_PCIE_RX, C_NVLINK_TX, C_NVLINK_RX, C_ECC_CORRECTED,
 C_ECC_UNCORRECTED, C_POWER_LIMIT, C_SM_CLOCK_MAX) = (COL[f] for f in (
    F.GPU_UTIL, F.GPU_MEM_UTIL, F.GPU_MEM_USED, F.GPU_MEM_TOTAL, F.GPU_POWER, F.GPU_ENERGY,
    F.GPU_TEMP, F.GPU_MEM_TEMP, F.GPU_SM_CLOCK, F.GPU_MEM_CLOCK, F.GPU_THROTTLE_REASONS,
    F.GPU_PCIE_TX, F.GPU_PCIE_RX, F.GPU_NVLINK_TX, F.GPU_NVLINK_RX, F.GPU_ECC_CORRECTED,
    F.GPU_ECC_UNCORRECTED, F.GPU_POWER_LIMIT, F.GPU_SM_CLOCK_MAX))
THERMAL_BITS = int(pb.THROTTLE_HW_THERMAL | pb.THROTTLE_SW_THERMAL)
POWER_CAP_BIT, IDLE_BIT = int(pb.THROTTLE_SW_POWER_CAP), int(pb.THROTTLE_GPU_IDLE)
EVENT_XID, EVENT_ECC, EVENT_THROTTLE = pb.EVENT_XID, pb.EVENT_ECC_UNCORRECTED, pb.EVENT_THROTTLE
EVENT_LOST, EVENT_BACK = pb.EVENT_GPU_LOST, pb.EVENT_GPU_RECOVERED
EVENT_PROCESS_MEMORY = pb.EVENT_PROCESS_MEMORY

# An H100 SXM, roughly: clocks in MHz, power in W, memory in MiB.
SM_CLOCK_MAX, SM_CLOCK_IDLE, MEM_CLOCK = 1980.0, 345.0, 2619.0
POWER_IDLE, POWER_MAX = 70.0, 700.0
MEM_TOTAL, MEM_TRAINING = 81559.0, 62000.0
NVLINK_COMM_MBPS, PCIE_LOAD_MBPS = 150_000.0, 3_000.0
TEMP_AMBIENT, TEMP_PER_W, TEMP_TAU_S = 28.0, 0.06, 15.0
CLOCK_SPREAD = 0.02     # GPUs of one model sustain 98-100 % of the max clock (silicon, cooling)
CLOCK_JITTER = 0.005    # and wander around it sample to sample (power management)
LINK_JITTER = 0.03      # link counters sampled every tick are noisy
UTIL_COMPUTE, UTIL_COMM, UTIL_EVAL, UTIL_CHECKPOINT = 97.0, 30.0, 70.0, 5.0
CHECKPOINT_PCIE_MBPS, EVAL_NVLINK_MBPS = 20_000.0, 2_000.0
DEFAULT_NODE_PREFIX = "sim-node-"
PROCESS_EVERY_S = 1.0   # process memory events this often, as NVML's source sends them
DRIVER_MIB = 500.0      # of a GPU's used memory, what is not its process's (driver, context)


class SimulatedGpus:
    name = "sim"

    def __init__(self, scenario: Scenario, hz: float, node_prefix: str = DEFAULT_NODE_PREFIX,
                 pids: dict[int, int] | None = None):
        """pids: GPU index -> the pid of the process on it, on every simulated node; each
        such GPU reports that process's memory (EVENT_PROCESS_MEMORY) once a second."""
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
        self.clock_base = 1.0 - self.rng.uniform(0, CLOCK_SPREAD, self.n)
        self.temp = np.full(self.n, TEMP_AMBIENT + 10.0)
        self.energy = self.rng.uniform(1e6, 5e6, self.n)
        self.ecc_uncorrected = np.zeros(self.n)
        self.leaked = np.zeros(self.n)
        self.throttle = np.zeros(self.n, dtype=np.int64)
        self.ecc_uncorrected_at: list = []
        self._fault_masks = [(f, self._mask(f)) for f in scenario.faults]
        self.process_rows = [(row, pids[int(gpu)]) for row, gpu in enumerate(self.gpu_of)
                             if int(gpu) in (pids or {})]

    def _mask(self, fault) -> np.ndarray:
        mask = self.node_of == fault.node
        if fault.gpu is not None:
            mask &= self.gpu_of == fault.gpu
        return mask

    def node_inventories(self) -> dict[str, pb.NodeInventory]:
        """Each simulated node's NodeInventory (what mlpe.inventory gets)."""
        gpus = self.inventory()
        return {node: pb.NodeInventory(node_id=node, hostname=socket.gethostname(),
                                       source="sim", gpus=gpus)
                for node in dict.fromkeys(d.node_id for d in self.devices)}

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
        values, events = self.read_block(k, np.array([t_ns], dtype=np.int64))
        return Reading(values=values[0], events=[(row, e) for _, row, e in events])

    def read_block(self, k0: int, times_ns: np.ndarray):
        """Samples k0 .. k0+T-1 at once: (T, devices, fields) values and (tick, row, event).

        The model is a function of the sample index, so evaluating a flush interval
        in one vectorised pass gives exactly the series tick-by-tick reads would.
        """
        s, dt = self.s, 1.0 / self.hz
        T, n = len(times_ns), self.n
        k = k0 + np.arange(T)
        t = (k / self.hz)[:, None]                                  # (T, 1)
        phase = ((t / s.step_time_s) + self.phase_offset) % 1.0     # (T, n)
        computing = phase < s.compute_fraction
        util = np.where(computing, UTIL_COMPUTE, UTIL_COMM)
        if t[0, 0] < s.warmup_s:
            util *= np.minimum(1.0, 0.2 + 0.8 * t / max(s.warmup_s, 1e-9))
        evaluating, checkpointing = np.zeros(T, dtype=bool), np.zeros(T, dtype=bool)
        for gap in s.idle_gaps:
            during = ((t >= gap.at_s) & (t < gap.at_s + gap.for_s))[:, 0]
            util[during] = {"eval": UTIL_EVAL, "checkpoint": UTIL_CHECKPOINT}.get(gap.kind, 0.0)
            evaluating |= during & (gap.kind == "eval")
            checkpointing |= during & (gap.kind == "checkpoint")
        paused = evaluating | checkpointing
        computing[paused] = evaluating[paused, None]  # no step rhythm in a pause
        clock = np.repeat(self.clock_base[None, :], T, axis=0)
        limit = np.full((T, n), POWER_MAX)
        link = np.ones((T, n))
        heat = np.zeros((T, n))
        throttle = np.zeros((T, n), dtype=np.int64)
        lost = np.zeros((T, n), dtype=bool)
        leak_rate = np.zeros((T, n))
        events: list[tuple[int, int, pb.DeviceEvent]] = []

        for fault, mask in self._fault_masks:
            onset = round(fault.at_s * self.hz)
            end = None if fault.for_s is None else round((fault.at_s + fault.for_s) * self.hz)
            if onset >= k0 + T or (end is not None and end < k0):
                continue  # not started yet, or over before this block
            active = (k >= onset) & ((k < end) if end is not None else True)
            rows = np.flatnonzero(mask)
            if k0 <= onset < k0 + T:
                i, t_on = onset - k0, int(times_ns[onset - k0])
                if fault.kind == "xid":
                    code = int(fault.magnitude)
                    events += [(i, r, pb.DeviceEvent(time_ns=t_on, kind=EVENT_XID, code=code,
                                                     detail=f"Xid {code} (simulated)"))
                               for r in rows]
                elif fault.kind == "ecc_error":
                    events += [(i, r, pb.DeviceEvent(
                        time_ns=t_on, kind=EVENT_ECC, code=int(fault.magnitude),
                        detail="uncorrected ECC error (simulated)")) for r in rows]
                elif fault.kind == "gpu_lost":
                    events += [(i, r, pb.DeviceEvent(time_ns=t_on, kind=EVENT_LOST, code=15,
                                                     detail="GPU fell off the bus (simulated)"))
                               for r in rows]
            if fault.kind == "gpu_lost" and end is not None and k0 <= end < k0 + T:
                i = end - k0
                events += [(i, r, pb.DeviceEvent(time_ns=int(times_ns[i]), kind=EVENT_BACK,
                                                 detail="GPU answers again (simulated)"))
                           for r in rows]
            if fault.kind == "ecc_error":
                if k0 <= onset < k0 + T:
                    self.ecc_uncorrected_at.append((onset, mask, fault.magnitude))
                continue
            if not active.any():
                continue
            on = active[:, None] & mask[None, :]                     # (T, n)
            m = fault.magnitude
            if fault.kind == "thermal_throttle":
                clock[on] *= 1.0 - m
                heat[on] += 18.0
                throttle[on] |= THERMAL_BITS
            elif fault.kind == "power_cap":
                limit[on] = POWER_MAX * m
            elif fault.kind == "memory_leak":
                leak_rate[on] += m
            elif fault.kind == "input_starvation":
                util[on] *= m
            elif fault.kind == "straggler":
                clock[on] *= 1.0 - m
                # Synchronous job: every other rank, on every node, finishes its compute
                # first and waits in the collective for a share ~m of its compute phase.
                waiting = active[:, None] & ~mask[None, :] & computing
                util[waiting] *= 1.0 - m * (UTIL_COMPUTE - UTIL_COMM) / UTIL_COMPUTE
            elif fault.kind == "link_degradation":
                link[on] *= 1.0 - m
            elif fault.kind == "stall":
                util[on] = 0.0
                link[on] = 0.0
            elif fault.kind == "gpu_lost":
                lost[on] = True

        # Drawn tick by tick, so any block size consumes the random stream identically.
        noise = self.rng.standard_normal((T, 5, n)).transpose(1, 0, 2)
        util = np.clip(util * (1.0 + 0.015 * noise[0]), 0.0, 100.0)
        clock = clock * np.minimum(1.0, 1.0 + CLOCK_JITTER * noise[3])
        link = link * np.maximum(0.0, 1.0 + LINK_JITTER * noise[4])
        wanted = POWER_IDLE + (POWER_MAX - POWER_IDLE) * util / 100.0 * (0.35 + 0.65 * clock)
        capped = wanted > limit
        clock = np.where(capped, clock * limit / wanted, clock)
        throttle[capped] |= POWER_CAP_BIT
        power = np.minimum(wanted, limit) + 3.0 * noise[1]
        idle = util < 1.0
        throttle[idle] |= IDLE_BIT
        temp, energy, leaked = np.empty((T, n)), np.empty((T, n)), np.empty((T, n))
        for i in range(T):  # state carried tick to tick (thermal lag, counters): a short loop
            self.temp += (TEMP_AMBIENT + TEMP_PER_W * power[i] + heat[i] - self.temp) \
                * dt / TEMP_TAU_S
            self.energy += power[i] * dt
            self.leaked += leak_rate[i] * dt
            temp[i], energy[i], leaked[i] = self.temp, self.energy, self.leaked
        ecc = np.repeat(self.ecc_uncorrected[None, :], T, axis=0)
        for onset, mask, added in self.ecc_uncorrected_at:
            if k0 <= onset < k0 + T:
                ecc[onset - k0:, mask] += added
                self.ecc_uncorrected[mask] += added
        self.ecc_uncorrected_at.clear()
        comm = (~computing) & ~idle & ~paused[:, None]

        out = np.empty((T, n, len(self.fields)))
        out[:, :, C_UTIL] = util
        out[:, :, C_MEM_UTIL] = util * 0.55
        out[:, :, C_MEM_USED] = np.minimum(self.mem_base + leaked, MEM_TOTAL)
        out[:, :, C_MEM_TOTAL] = MEM_TOTAL
        out[:, :, C_POWER] = power
        out[:, :, C_ENERGY] = energy
        out[:, :, C_TEMP] = temp + 0.2 * noise[2]
        out[:, :, C_MEM_TEMP] = temp + 6.0
        out[:, :, C_SM_CLOCK] = np.where(idle, SM_CLOCK_IDLE, SM_CLOCK_MAX * clock)
        out[:, :, C_MEM_CLOCK] = MEM_CLOCK
        out[:, :, C_THROTTLE] = throttle
        out[:, :, C_PCIE_TX] = np.where(idle, 0.0, np.where(
            checkpointing[:, None], CHECKPOINT_PCIE_MBPS, 400.0)) * link
        out[:, :, C_PCIE_RX] = np.where(computing & ~idle, PCIE_LOAD_MBPS, 200.0) * link
        out[:, :, C_NVLINK_TX] = np.where(comm, NVLINK_COMM_MBPS, np.where(
            evaluating[:, None] & ~idle, EVAL_NVLINK_MBPS, 0.0)) * link
        out[:, :, C_NVLINK_RX] = out[:, :, C_NVLINK_TX]
        out[:, :, C_ECC_CORRECTED] = 0.0
        out[:, :, C_ECC_UNCORRECTED] = ecc
        out[:, :, C_POWER_LIMIT] = limit
        out[:, :, C_SM_CLOCK_MAX] = SM_CLOCK_MAX
        out[lost] = np.nan

        every = max(1, round(self.hz * PROCESS_EVERY_S))
        for i in np.flatnonzero(k % every == 0) if self.process_rows else ():
            for r, pid in self.process_rows:
                if not lost[i, r]:  # NVML does not answer for a lost GPU
                    mib = float(out[i, r, C_MEM_USED]) - DRIVER_MIB
                    events.append((int(i), r, pb.DeviceEvent(
                        time_ns=int(times_ns[i]), kind=EVENT_PROCESS_MEMORY, code=pid,
                        value=mib, detail=f"pid {pid}: {int(mib)} MiB (simulated)")))

        previous = np.concatenate([self.throttle[None, :], throttle[:-1]])
        for i, r in zip(*np.nonzero((throttle != previous) & ~lost), strict=True):
            code = int(throttle[i, r])
            events.append((int(i), int(r), pb.DeviceEvent(
                time_ns=int(times_ns[i]), kind=EVENT_THROTTLE, code=code,
                detail=f"throttle reasons now {code:#x}")))
        self.throttle = throttle[-1].copy()
        events.sort(key=lambda e: e[0])
        return out, events
