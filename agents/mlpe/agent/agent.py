"""The node agent: sample every source at a fixed rate, batch per device, ship.

A sampler thread keeps the tick schedule (absolute deadlines, so jitter never
accumulates) and writes each reading into preallocated numpy buffers; every
flush interval it encodes one MetricBatch per device and hands the records to
the shipper on the event loop. Kafka being slow or away never delays a tick.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from mlpe.agent.shipper import Shipper
from mlpe.agent.sources.base import Source
from mlpe.agent.spool import Record
from mlpe.common import batches
from mlpe.common.topics import GPU_METRICS, HOST_METRICS, INVENTORY
from mlpe.v1 import metrics_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class AgentStats:
    ticks: int = 0
    samples: int = 0          # device samples taken
    values: int = 0           # field values taken (samples x fields)
    batches: int = 0
    events: int = 0
    late_ticks: int = 0       # ticks that started more than one period late
    # Lateness of the most recent ticks (a ring: bounded memory however long it runs).
    jitter_s: np.ndarray = field(default_factory=lambda: np.zeros(1 << 16))

    def jitter_ms(self, q: float) -> float:
        recent = self.jitter_s[:min(self.ticks, len(self.jitter_s))]
        return float(np.percentile(recent, q) * 1e3) if len(recent) else 0.0


class _SourceBuffer:
    """One flush interval of one source: (samples, devices, fields) plus events."""

    def __init__(self, source: Source, capacity: int, every: int, epoch_ns: int):
        self.source, self.every, self.epoch_ns = source, every, epoch_ns
        n_dev, n_fields = len(source.devices), len(source.fields)
        self.values = np.empty((capacity, n_dev, n_fields))
        self.times = np.empty(capacity, dtype=np.int64)
        self.events: list[list[pb.DeviceEvent]] = [[] for _ in range(n_dev)]
        self.n = 0
        self.batch_seq = np.zeros(n_dev, dtype=np.int64)
        self.sample_seq = np.zeros(n_dev, dtype=np.int64)
        kind = source.devices[0].kind if source.devices else pb.DEVICE_KIND_GPU
        self.topic = GPU_METRICS.name if kind == pb.DEVICE_KIND_GPU else HOST_METRICS.name

    def take(self, k: int, t_ns: int) -> int:
        reading = self.source.read(k, t_ns)
        self.values[self.n] = reading.values
        self.times[self.n] = t_ns
        self.n += 1
        for row, event in reading.events:
            self.events[row].append(event)
        return len(reading.events)

    def drain(self, hz: float) -> list[Record]:
        if self.n == 0:
            return []
        records = []
        fields = self.source.fields
        for d, device in enumerate(self.source.devices):
            batch = batches.Batch(
                node_id=device.node_id, device_kind=device.kind, device_index=device.index,
                device_uuid=device.uuid, agent_epoch_ns=self.epoch_ns,
                batch_seq=int(self.batch_seq[d]), first_sample_seq=int(self.sample_seq[d]),
                timestamps_ns=self.times[:self.n],
                columns={f: self.values[:self.n, d, c] for c, f in enumerate(fields)},
                events=self.events[d], sample_hz=hz / self.every,
            )
            records.append(Record(self.topic, device.node_id.encode(), batches.encode(batch)))
        self.batch_seq += 1
        self.sample_seq += self.n
        self.n = 0
        self.events = [[] for _ in self.source.devices]
        return records


class Agent:
    def __init__(self, sources: list[tuple[Source, float]], shipper: Shipper, *,
                 hz: float = 100.0, flush_s: float = 0.1, inventory: list[Record] = ()):
        """sources: (source, its rate in Hz, at most `hz`)."""
        self.hz = hz
        self.ticks_per_flush = max(1, round(hz * flush_s))
        self.epoch_ns = time.time_ns()
        self.buffers = []
        for source, rate in sources:
            every = max(1, round(hz / min(rate, hz)))
            capacity = -(-self.ticks_per_flush // every)
            self.buffers.append(_SourceBuffer(source, capacity, every, self.epoch_ns))
        self.shipper = shipper
        self.inventory = list(inventory)
        self.stats = AgentStats()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _sample_loop(self, loop: asyncio.AbstractEventLoop, duration_s: float | None) -> None:
        period = 1.0 / self.hz
        start = time.monotonic()
        k = 0
        stats = self.stats
        while not self._stop.is_set():
            deadline = start + k * period
            if duration_s is not None and k * period >= duration_s:
                break
            delay = deadline - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            lateness = now - deadline
            stats.jitter_s[stats.ticks % len(stats.jitter_s)] = lateness
            if lateness > period:
                stats.late_ticks += 1
            t_ns = time.time_ns()
            for buf in self.buffers:
                if k % buf.every == 0:
                    stats.events += buf.take(k // buf.every, t_ns)
                    stats.samples += len(buf.source.devices)
                    stats.values += buf.values.shape[1] * buf.values.shape[2]
            stats.ticks += 1
            k += 1
            if k % self.ticks_per_flush == 0:
                self._flush(loop)
        self._flush(loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        records: list[Record] = []
        for buf in self.buffers:
            if hasattr(buf.source, "read_utilization"):
                buf.source.read_utilization()
            records += buf.drain(self.hz)
        if records:
            self.stats.batches += len(records)
            loop.call_soon_threadsafe(self.shipper.submit, records)

    async def run(self, duration_s: float | None = None, drain_timeout_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        ship = asyncio.create_task(self.shipper.run())
        if self.inventory:
            self.shipper.submit(self.inventory)
        sampler = threading.Thread(target=self._sample_loop, args=(loop, duration_s),
                                   name="mlpe-sampler", daemon=True)
        sampler.start()
        try:
            while sampler.is_alive():
                await asyncio.sleep(0.2)
        finally:
            self._stop.set()
            await asyncio.to_thread(sampler.join)
            await asyncio.sleep(0)  # let the last call_soon_threadsafe land
            await self.shipper.close(ship, timeout=drain_timeout_s)


def inventory_records(node_ids: list[str], make) -> list[Record]:
    """One NodeInventory per node on mlpe.inventory (compacted, keyed by node id)."""
    return [Record(INVENTORY.name, node.encode(), make(node).SerializeToString())
            for node in node_ids]
