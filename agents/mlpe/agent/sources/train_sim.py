"""A simulated data-parallel training job on the simulated GPUs: TrainStep events.

One rank per simulated GPU. The job advances at a speed set per sample tick
(slower in warm-up and under slowing faults, stopped in idle gaps and while a
GPU stalls or is lost: a synchronous job waits for its slowest rank), and a
step ends each time step_time_s worth of work is done. Like the GPU simulator
it is a function of the sample index k (time k/hz) and every step's noise is
drawn from (seed, step), so a seed gives the same events however time is sliced.
"""

from __future__ import annotations

import math

import numpy as np

from mlpe.agent.scenario import ONE_STEP_KINDS, Fault, Scenario
from mlpe.agent.sources.sim import DEFAULT_NODE_PREFIX, MEM_TRAINING
from mlpe.v1 import training_pb2

MIB = 1 << 20
LOSS_FLOOR = 2.0             # the loss decays toward this
LOSS_DECAY_STEPS = 400.0
LEARNING_RATE = 3e-4
LR_WARMUP_STEPS = 100
WARMUP_SLOWDOWN = 2.0        # the first steps take twice as long, easing to normal by warmup_s
TRAIN_STREAM = 0x7A1         # keeps these draws apart from the GPU simulator's, same seed
CHUNK_TICKS = 1 << 16        # ticks integrated at once: bounds memory when skipping ahead
# Work is counted in integer units (1/2**24 of a full-speed tick): integer sums are exact,
# so the same step ends come out however the ticks are grouped into blocks.
WORK_UNITS_PER_TICK = 1 << 24
JITTER_SLOTS = 1 << 16       # step_jitter: one speed factor per step-long slot of time, cycled

# GPU faults that stop the synchronous job (the collective blocks every rank).
BLOCKING_KINDS = {"stall", "gpu_lost"}
# GPU faults that make one rank slow, and so every step: fault -> step time factor.
SLOWING_KINDS = {
    "straggler": lambda m: 1.0 / max(1.0 - m, 0.1),
    "thermal_throttle": lambda m: 1.0 / max(1.0 - m, 0.1),
    "input_starvation": lambda m: 1.0 / max(m, 0.1),
}
# power_cap, xid, ecc_error, memory_leak and link_degradation leave steps alone:
# the simulated GPUs show them, but this job's compute-bound step time does not.


def default_job_id(node_prefix: str) -> str:
    """Unique per node prefix, so two simulated fleets never share a job."""
    return "sim-job" if node_prefix == DEFAULT_NODE_PREFIX else f"{node_prefix}job"


class SimulatedTraining:
    def __init__(self, scenario: Scenario, hz: float, node_prefix: str = DEFAULT_NODE_PREFIX):
        self.s = scenario
        self.hz = hz
        self.job_id = scenario.job_id or default_job_id(node_prefix)
        self.world_size = scenario.nodes * scenario.gpus_per_node
        ranks = np.arange(self.world_size)
        self.node_ids = [f"{node_prefix}{node:02d}" for node in ranks // scenario.gpus_per_node]
        self.gpu_indexes = (ranks % scenario.gpus_per_node).tolist()
        rng = np.random.default_rng([scenario.seed, TRAIN_STREAM])
        self.mem_reserved = (MEM_TRAINING - 1500 + rng.uniform(-500, 500, self.world_size)) * MIB
        self.work_per_step = round(scenario.step_time_s * hz * WORK_UNITS_PER_TICK)
        # Batches of varying length: some steps fast, some slow, the same every run.
        self.jitter = 1.0 + scenario.step_jitter * np.random.default_rng(
            [scenario.seed, TRAIN_STREAM, 1 << 40]).uniform(-1.0, 1.0, JITTER_SLOTS)
        self.faults = [(f, round(f.at_s * hz),
                        None if f.for_s is None else round((f.at_s + f.for_s) * hz))
                       for f in scenario.faults]
        self._rewind()

    def _rewind(self) -> None:
        """Back to the job's start (only needed when asked about the past again)."""
        self.tick = 0            # next tick whose work is not yet counted
        self.work = 0            # work units done by the start of self.tick
        self.steps_done = 0
        self.last_end = 0.0      # end of the last step, in ticks (fractional)

    # -- the job's pace ------------------------------------------------------------------
    def speed(self, ticks: np.ndarray) -> np.ndarray:
        """Work done per tick (1 = full speed) over each tick of `ticks`."""
        s, t = self.s, ticks / self.hz
        step_factor = np.ones(len(ticks))
        if s.step_jitter:
            step_factor *= self.jitter[(t / s.step_time_s).astype(np.int64) % JITTER_SLOTS]
        if s.warmup_s > 0:
            step_factor *= 1.0 + (WARMUP_SLOWDOWN - 1.0) * np.clip(1.0 - t / s.warmup_s, 0, 1)
        blocked = np.zeros(len(ticks), dtype=bool)
        for gap in s.idle_gaps:
            blocked |= (t >= gap.at_s) & (t < gap.at_s + gap.for_s)
        slowest = np.ones(len(ticks))  # everyone waits for the slowest rank: max, not product
        for fault, onset, end in self.faults:
            active = (ticks >= onset) & ((ticks < end) if end is not None else True)
            if fault.kind in BLOCKING_KINDS:
                blocked |= active
            elif fault.kind in SLOWING_KINDS:
                factor = SLOWING_KINDS[fault.kind](fault.magnitude)
                slowest = np.where(active, np.maximum(slowest, factor), slowest)
            elif fault.kind == "slow_steps":
                step_factor = np.where(active, step_factor * fault.magnitude, step_factor)
        return np.where(blocked, 0.0, 1.0 / (step_factor * slowest))

    def _step_ends(self, k_end: int) -> list[tuple[int, float, float, int]]:
        """Advance to sample k_end: (step, end, previous end, sample) of each step ended.

        Ends are in ticks (fractional). A step ending inside tick j's interval (j, j+1]
        belongs to sample j+1, the first sample at or after its end, so the steps of
        samples before k_end need the ticks before k_end-1.
        """
        ended = []
        while self.tick < k_end - 1:
            ticks = np.arange(self.tick, min(k_end - 1, self.tick + CHUNK_TICKS))
            speed = np.round(self.speed(ticks) * WORK_UNITS_PER_TICK).astype(np.int64)
            work_after = self.work + np.cumsum(speed)
            work_before = work_after - speed
            done_after = work_after // self.work_per_step
            for i in np.flatnonzero(done_after > np.concatenate(([self.steps_done],
                                                                  done_after[:-1]))):
                for step in range(self.steps_done + 1, int(done_after[i]) + 1):
                    into = int(step * self.work_per_step - work_before[i]) / int(speed[i])
                    end = int(ticks[i]) + into  # in (tick, tick + 1]
                    ended.append((step, end, self.last_end, int(ticks[i]) + 1))
                    self.steps_done, self.last_end = step, end
            self.tick, self.work = int(ticks[-1]) + 1, int(work_after[-1])
        return ended

    # -- events --------------------------------------------------------------------------
    def steps_between(self, k0: int, k1: int,
                      times_ns: np.ndarray) -> list[training_pb2.TrainStep]:
        """Every rank's TrainStep for the steps that ended within samples [k0, k1).

        times_ns[i] is the time of sample k0 + i. Ranges are usually asked in order;
        asking about an earlier one replays the job from its start.
        """
        if k0 < self.tick + 1:  # the steps of samples before tick + 1 are already out
            self._rewind()
        self._step_ends(k0)  # skip the steps before k0 (nothing to do when asked in order)
        out = []
        for step, end, previous, sample in self._step_ends(k1):
            early_ns = round((sample - end) * 1e9 / self.hz)  # it ended before the sample
            out += self._step_events(step, int(times_ns[sample - k0]) - early_ns,
                                     end / self.hz, previous / self.hz)
        return out

    def _step_events(self, step: int, time_ns: int, end_s: float,
                     previous_end_s: float) -> list[training_pb2.TrainStep]:
        s, n = self.s, self.world_size
        rng = np.random.default_rng([s.seed, TRAIN_STREAM, step])
        job_noise, grad_noise = rng.standard_normal(2)
        rank_loss_noise, rank_time_noise, rank_mem_noise = rng.standard_normal((3, n))
        floor = min(LOSS_FLOOR, s.loss_start)
        job_loss = floor + (s.loss_start - floor) * math.exp(-(step - 1) / LOSS_DECAY_STEPS)
        loss = job_loss * (1.0 + 0.01 * job_noise) * (1.0 + 0.003 * rank_loss_noise)
        grad_norm = abs(1.0 + 0.1 * grad_noise)  # all-reduced: the same on every rank
        for fault in self.s.faults:
            if self._hits(fault, end_s, previous_end_s):
                if fault.kind == "nan_loss":
                    loss[:] = math.nan
                    grad_norm = math.nan
                elif fault.kind == "loss_spike":
                    loss *= fault.magnitude
                    grad_norm *= fault.magnitude
        # Ranks finish the same collective within a few milliseconds of each other.
        step_times = (end_s - previous_end_s) * (1.0 + 0.003 * rank_time_noise)
        reserved = self.mem_reserved
        allocated = reserved * (0.9 + 0.005 * rank_mem_noise)
        lr = LEARNING_RATE * min(1.0, step / LR_WARMUP_STEPS)
        return [
            training_pb2.TrainStep(
                job_id=self.job_id, rank=rank, world_size=n, step=step, time_ns=time_ns,
                loss=float(loss[rank]), tokens_per_s=s.tokens_per_step / float(step_times[rank]),
                step_time_s=float(step_times[rank]), mem_allocated_bytes=int(allocated[rank]),
                mem_reserved_bytes=int(reserved[rank]), grad_norm=grad_norm, learning_rate=lr,
                node_id=self.node_ids[rank], gpu_index=self.gpu_indexes[rank], micro_batches=1)
            for rank in range(n)
        ]

    def _hits(self, fault: Fault, end_s: float, previous_end_s: float) -> bool:
        """Does a loss fault touch the step that ended at end_s?"""
        if fault.kind not in ONE_STEP_KINDS:
            return False
        if fault.for_s is None:  # the first step ending at or after the onset
            began_before = previous_end_s < fault.at_s or previous_end_s == 0.0  # or step 1
            return began_before and fault.at_s <= end_s
        return fault.at_s <= end_s < fault.at_s + fault.for_s
