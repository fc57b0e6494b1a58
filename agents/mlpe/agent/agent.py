"""The node agent: sample every source at a fixed rate, batch per node, ship.

A sampler thread keeps the tick schedule (absolute deadlines, so jitter never
accumulates) and writes each reading into preallocated numpy buffers; every
flush interval it encodes one MetricBatch per node (all its GPUs) and hands the records to
the shipper on the event loop. Kafka being slow or away never delays a tick.
With the simulator, the simulated training job's step events for the same
ticks go out at each flush too, through the same shipper and spool.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mlpe.agent.shipper import Shipper
from mlpe.agent.sources.base import Source
from mlpe.agent.spool import Record
from mlpe.common import batches
from mlpe.common.topics import GPU_METRICS, HOST_METRICS, INVENTORY, TRAIN_EVENTS
from mlpe.v1 import metrics_pb2 as pb
from mlpe.v1 import training_pb2

log = logging.getLogger(__name__)


@dataclass
class AgentStats:
    ticks: int = 0
    samples: int = 0          # device samples taken
    values: int = 0           # field values taken (samples x fields)
    batches: int = 0
    events: int = 0
    train_steps: int = 0      # TrainStep events (one per rank per step)
    stopped_at: float = 0.0   # wall time and process CPU seconds when sampling ended
    cpu_at_stop: float = 0.0
    wakeups: int = 0          # sampler wake-ups (every tick with a live source)
    late_ticks: int = 0       # wake-ups more than one wake period late
    # Lateness of the most recent ticks (a ring: bounded memory however long it runs).
    jitter_s: np.ndarray = field(default_factory=lambda: np.zeros(1 << 16))

    def jitter_ms(self, q: float) -> float:
        recent = self.jitter_s[:min(self.wakeups, len(self.jitter_s))]
        return float(np.percentile(recent, q) * 1e3) if len(recent) else 0.0


class TrainingJob(Protocol):
    """A source of step events on the agent's tick clock (the simulated job)."""

    def steps_between(self, k0: int, k1: int,
                      times_ns: np.ndarray) -> list[training_pb2.TrainStep]: ...


class _SourceBuffer:
    """One flush interval of one source: (samples, devices, fields) plus events."""

    def __init__(self, source: Source, capacity: int, every: int, epoch_ns: int,
                 job_id: str = ""):
        self.source, self.every, self.epoch_ns, self.job_id = source, every, epoch_ns, job_id
        n_dev, n_fields = len(source.devices), len(source.fields)
        self.values = np.empty((capacity, n_dev, n_fields))
        self.times = np.empty(capacity, dtype=np.int64)
        self.events: list[list[pb.DeviceEvent]] = [[] for _ in range(n_dev)]
        self.n = 0
        self.k0 = 0
        # The simulator evaluates a whole flush interval in one vectorised pass.
        self.block = hasattr(source, "read_block")
        self.batch_seq = np.zeros(n_dev, dtype=np.int64)
        self.sample_seq = np.zeros(n_dev, dtype=np.int64)
        kind = source.devices[0].kind if source.devices else pb.DEVICE_KIND_GPU
        # One message per node: the node's rows of the device axis, which sources list
        # node by node (the simulator: every GPU of node 00, then of node 01, ...).
        self.nodes: list[tuple[str, int, np.ndarray]] = []
        for row, device in enumerate(source.devices):
            if self.nodes and self.nodes[-1][0] == device.node_id:
                self.nodes[-1][2].append(row)
            elif any(node == device.node_id for node, _, _ in self.nodes):
                raise ValueError(f"source {source.name}: the devices of node "
                                 f"{device.node_id} are not listed together")
            else:
                self.nodes.append((device.node_id, device.kind, [row]))
        self.nodes = [(node, k, np.array(rows)) for node, k, rows in self.nodes]
        self.topic = GPU_METRICS.name if kind == pb.DEVICE_KIND_GPU else HOST_METRICS.name

    def take(self, k: int, t_ns: int) -> int:
        """Record one tick; a source that reads in blocks is evaluated at drain()."""
        if self.n == 0:
            self.k0 = k
        self.times[self.n] = t_ns
        if self.block:
            self.n += 1
            return 0
        reading = self.source.read(k, t_ns)
        self.values[self.n] = reading.values
        self.n += 1
        for row, event in reading.events:
            self.events[row].append(event)
        return len(reading.events)

    def drain(self, hz: float) -> list[Record]:
        if self.n == 0:
            return []
        if self.block:
            values, events = self.source.read_block(self.k0, self.times[:self.n])
            self.values[:self.n] = values
            for _, row, event in events:
                self.events[row].append(event)
        template = pb.MetricBatch(agent_epoch_ns=self.epoch_ns, sample_hz=hz / self.every,
                                  job_id=self.job_id)
        devices = self.source.devices
        nodes = [(node, kind, rows, [
            pb.Device(index=devices[r].index, uuid=devices[r].uuid,
                      batch_seq=int(self.batch_seq[r]),
                      first_sample_seq=int(self.sample_seq[r]), events=self.events[r])
            for r in rows]) for node, kind, rows in self.nodes]
        encoded = batches.encode_nodes(template, nodes, self.times[:self.n],
                                       self.values[:self.n], self.source.fields)
        records = [Record(self.topic, node.encode(), value)
                   for (node, _, _), value in zip(self.nodes, encoded, strict=True)]
        self.batch_seq += 1
        self.sample_seq += self.n
        self.n = 0
        self.events = [[] for _ in self.source.devices]
        return records


class Agent:
    def __init__(self, sources: list[tuple[Source, float]], shipper: Shipper, *,
                 hz: float = 100.0, flush_s: float = 0.1, inventory: list[Record] = (),
                 training: TrainingJob | None = None, job_id: str = ""):
        """sources: (source, its rate in Hz, at most `hz`); training: its steps per flush;
        job_id: the job this node works for, carried by every batch (peer comparison)."""
        self.hz = hz
        self.ticks_per_flush = max(1, round(hz * flush_s))
        self.epoch_ns = time.time_ns()
        self.buffers = []
        for source, rate in sources:
            every = max(1, round(hz / min(rate, hz)))
            capacity = -(-self.ticks_per_flush // every)
            self.buffers.append(_SourceBuffer(source, capacity, every, self.epoch_ns, job_id))
        live = [buf.every for buf in self.buffers if not buf.block]
        self.wake_every = math.gcd(self.ticks_per_flush, *live)
        self.shipper = shipper
        self.inventory = list(inventory)
        self.stats = AgentStats()
        self.training = training
        self.train_k = 0          # first tick whose training steps are not yet shipped
        self.start_ns = time.time_ns()
        self.period_ns = 1e9 / hz
        self._stop = threading.Event()

    def tick_ns(self, j: int) -> int:
        """The scheduled time of tick j (simulated sources are stamped with it)."""
        return self.start_ns + round(j * self.period_ns)

    def stop(self) -> None:
        self._stop.set()

    def _sample_loop(self, loop: asyncio.AbstractEventLoop, duration_s: float | None) -> None:
        """Keep the tick schedule; wake only as often as some source must be read live.

        Live sources (NVML, host) are read at their tick; block sources (the simulator)
        get the scheduled timestamps of every tick and are evaluated at flush. So a
        simulator-only agent wakes once per flush, an NVML agent every tick.
        """
        period = 1.0 / self.hz
        step = self.wake_every
        start, self.start_ns = time.monotonic(), time.time_ns()
        stats = self.stats
        k = step - 1  # the last tick of the first group
        while not self._stop.is_set():
            if duration_s is not None and k * period >= duration_s:
                break
            deadline = start + k * period
            delay = deadline - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            lateness = time.monotonic() - deadline
            stats.jitter_s[stats.wakeups % len(stats.jitter_s)] = lateness
            stats.wakeups += 1
            if lateness > period * step:
                stats.late_ticks += 1
            now_ns = time.time_ns()
            for j in range(k - step + 1, k + 1):
                for buf in self.buffers:
                    if j % buf.every == 0:
                        t_ns = self.tick_ns(j) if buf.block else now_ns
                        stats.events += buf.take(j // buf.every, t_ns)
                        stats.samples += len(buf.source.devices)
                        stats.values += buf.values.shape[1] * buf.values.shape[2]
                stats.ticks += 1
            if (k + 1) % self.ticks_per_flush == 0:
                self._flush(loop, k + 1)
            k += step
        self._flush(loop, k - step + 1)

    def _flush(self, loop: asyncio.AbstractEventLoop, ticks_taken: int) -> None:
        records: list[Record] = []
        for buf in self.buffers:
            if hasattr(buf.source, "read_utilization"):
                buf.source.read_utilization()
            records += buf.drain(self.hz)
        self.stats.batches += len(records)
        records += self.drain_training(ticks_taken)
        if records:
            loop.call_soon_threadsafe(self.shipper.submit, records)

    def drain_training(self, ticks_taken: int) -> list[Record]:
        """Step events of the training job for the ticks since the last flush."""
        if self.training is None or ticks_taken <= self.train_k:
            return []
        k0, self.train_k = self.train_k, ticks_taken
        times = np.array([self.tick_ns(j) for j in range(k0, ticks_taken)], dtype=np.int64)
        steps = self.training.steps_between(k0, ticks_taken, times)
        self.stats.train_steps += len(steps)
        return train_step_records(steps)

    async def run(self, duration_s: float | None = None, drain_timeout_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        ship = asyncio.create_task(self.shipper.run())
        if self.inventory:
            self.shipper.submit(self.inventory)
        finished = asyncio.Event()

        def sample() -> None:
            try:
                self._sample_loop(loop, duration_s)
            finally:
                loop.call_soon_threadsafe(finished.set)

        sampler = threading.Thread(target=sample, name="mlpe-sampler", daemon=True)
        sampler.start()
        try:
            await finished.wait()
            self.stats.stopped_at, self.stats.cpu_at_stop = time.time(), time.process_time()
        finally:
            self._stop.set()
            await asyncio.to_thread(sampler.join)
            await asyncio.sleep(0)  # let the last call_soon_threadsafe land
            await self.shipper.close(ship, timeout=drain_timeout_s)


def train_step_records(steps: list[training_pb2.TrainStep]) -> list[Record]:
    """TrainStep events on mlpe.events.train, keyed by job id (one job, one partition)."""
    return [Record(TRAIN_EVENTS.name, step.job_id.encode(), step.SerializeToString())
            for step in steps]


def inventory_records(node_ids: list[str], make) -> list[Record]:
    """One NodeInventory per node on mlpe.inventory (compacted, keyed by node id)."""
    return [Record(INVENTORY.name, node.encode(), make(node).SerializeToString())
            for node in node_ids]
