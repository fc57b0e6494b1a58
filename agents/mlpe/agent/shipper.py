"""Gets records to Kafka, or to the disk spool while Kafka is away, in order.

Records are grouped per topic-partition (murmur2 of the key, as Kafka's own
clients do) into one producer batch each, so a flush of eight GPUs costs one
send, not eight. The producer is idempotent, acks=all, lz4-compressed.

An idempotent producer retries a batch until it is delivered, so an outage
shows up as a batch not acknowledged within `delivery_timeout_s`. Then the
shipper aborts the producer (after which nothing it holds can still be
delivered), spools every unacknowledged record and everything newer, and
appends to the spool until it has been replayed, oldest first. Each outage gets
a fresh producer, so the idempotence sequence starts clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from mlpe.agent.spool import Record, Spool

log = logging.getLogger(__name__)
FAILURES = (KafkaError, OSError, TimeoutError, asyncio.CancelledError)
REPLAY_CHUNK = 2000


@dataclass
class ShipperStats:
    sent: int = 0          # records acknowledged by Kafka
    spooled: int = 0       # records that went through the spool
    outages: int = 0
    acked_bytes: int = 0
    sends: int = 0         # producer batches sent
    replayed: int = 0      # of `sent`, records that came from the spool (counted twice)

    @property
    def settled(self) -> int:
        """Records submitted so far that are acknowledged or on disk, oldest first: every
        record before this count is safe from a crash of this process."""
        return self.sent + self.spooled - self.replayed


class Shipper:
    def __init__(self, bootstrap: str, spool: Spool, *, compression: str = "lz4",
                 max_in_flight: int = 50_000, request_timeout_ms: int = 10_000,
                 linger_ms: int = 200, linger_records: int = 5_000,
                 delivery_timeout_s: float = 10.0):
        self.bootstrap = bootstrap
        self.spool = spool
        self.compression = compression
        self.max_in_flight = max_in_flight
        self.request_timeout_ms = request_timeout_ms
        self.delivery_timeout_s = delivery_timeout_s
        # Records wait up to linger_ms (or until linger_records queue) so that several
        # flush intervals share one produce request: far fewer wake-ups per second.
        self.linger_s = linger_ms / 1000
        self.linger_records = linger_records
        self.pending_since = 0.0
        self.stats = ShipperStats()
        self.pending: deque[Record] = deque()
        self.inflight: deque[tuple[list[Record], asyncio.Future, float]] = deque()
        self.inflight_records = 0
        self.producer: AIOKafkaProducer | None = None
        self.partitions: dict[str, list[int]] = {}
        self.up = False
        self._wake = asyncio.Event()
        self._closing = False

    def submit(self, records: list[Record]) -> None:
        """Queue records (event-loop thread only; the sampler uses call_soon_threadsafe)."""
        first = not self.pending
        if first:
            self.pending_since = time.monotonic()
        self.pending.extend(records)
        # Wake the sender to start the linger clock (or to send now when enough waits).
        if first or len(self.pending) >= self.linger_records or not self.up:
            self._wake.set()

    def _lingering(self) -> float:
        """Seconds until pending records should go; 0 when they should go now."""
        if self._closing or len(self.pending) >= self.linger_records:
            return 0.0
        return max(0.0, self.pending_since + self.linger_s - time.monotonic())

    # -- connection --------------------------------------------------------------------
    async def _connect(self) -> bool:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=True,
            acks="all",
            compression_type=self.compression,
            linger_ms=0,  # we linger ourselves, before building batches
            max_batch_size=1 << 20,
            request_timeout_ms=self.request_timeout_ms,
        )
        try:
            await asyncio.wait_for(producer.start(), timeout=self.request_timeout_ms / 1000)
        except FAILURES as err:
            with contextlib.suppress(*FAILURES):
                await producer.stop()
            log.debug("kafka not reachable at %s: %s", self.bootstrap, err)
            return False
        self.producer, self.up, self.partitions = producer, True, {}
        log.info("kafka: connected to %s", self.bootstrap)
        return True

    async def _disconnect(self) -> None:
        """Close the producer. stop() flushes first, which never ends while the broker is
        away (idempotent batches are retried until delivered); then cancel its sender
        instead, so that nothing it still holds can be delivered behind our back."""
        producer, self.producer, self.up = self.producer, None, False
        if producer is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(producer.stop()), timeout=2)
            return
        except FAILURES:
            pass
        sender = getattr(producer, "_sender", None)  # aiokafka internals, guarded
        if sender is not None:
            with contextlib.suppress(*FAILURES):
                await asyncio.wait_for(sender.close(), timeout=5)
        with contextlib.suppress(*FAILURES):
            await asyncio.wait_for(producer.client.close(), timeout=5)

    # -- sending -------------------------------------------------------------------------
    async def _send(self, records: list[Record]) -> list[tuple[list[Record], asyncio.Future]]:
        """One producer batch per topic-partition, record order kept within each."""
        groups: dict[tuple[str, int], list[Record]] = {}
        for record in records:
            parts = self.partitions.get(record.topic)
            if parts is None:
                parts = sorted(await self.producer.partitions_for(record.topic))
                self.partitions[record.topic] = parts
            partition = parts[(murmur2(record.key) & 0x7FFFFFFF) % len(parts)]
            groups.setdefault((record.topic, partition), []).append(record)
        sent = []
        for (topic, partition), group in groups.items():
            start = 0
            while start < len(group):
                batch = self.producer.create_batch()
                end = start
                while end < len(group) and batch.append(
                        key=group[end].key, value=group[end].value, timestamp=None) is not None:
                    end += 1
                if end == start:
                    raise ValueError(f"a record of {len(group[start].value)} bytes does not "
                                     "fit in one producer batch")
                batch.close()
                future = await self.producer.send_batch(batch, topic, partition=partition)
                future.add_done_callback(lambda _: self._wake.set())
                sent.append((group[start:end], future, time.monotonic()))
                self.stats.sends += 1
                start = end
        return sent

    def _delivered(self, records: list[Record]) -> None:
        self.stats.sent += len(records)
        self.stats.acked_bytes += sum(len(r.value) for r in records)

    def _to_spool(self, records: list[Record]) -> None:
        if records:
            self.spool.append(records)
            self.stats.spooled += len(records)

    def _unacknowledged(self) -> list[Record]:
        """After the producer is closed: in-flight records never acknowledged, in order."""
        failed: list[Record] = []
        for records, future, _ in self.inflight:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._delivered(records)
            else:
                failed += records
        self.inflight.clear()
        self.inflight_records = 0
        return failed

    def _reap(self) -> bool:
        """Collect finished batches in order; False at a failure or a batch overdue."""
        while self.inflight and self.inflight[0][1].done():
            records, future, _ = self.inflight[0]
            if future.cancelled() or future.exception() is not None:
                return False
            self.inflight.popleft()
            self.inflight_records -= len(records)
            self._delivered(records)
        return not (self.inflight and self._overdue_in() == 0.0)

    def _overdue_in(self) -> float:
        """Seconds until the oldest in-flight batch counts as undeliverable."""
        return max(0.0, self.inflight[0][2] + self.delivery_timeout_s - time.monotonic())

    async def _outage(self) -> None:
        """Kafka is away: abort the producer, then spool, in order, every record it did not
        acknowledge followed by everything newer."""
        log.warning("kafka: no acknowledgement for %.0f s; spooling to %s",
                    self.delivery_timeout_s, self.spool.dir)
        await self._disconnect()
        self._to_spool(self._unacknowledged() + list(self.pending))
        self.pending.clear()
        self.stats.outages += 1

    async def _replay(self) -> bool:
        """Send the spool, oldest first, a chunk at a time, acknowledged before removal."""
        while len(self.spool):
            chunk = self.spool.peek(REPLAY_CHUNK)
            try:
                sent = await self._send([record for record, _, _ in chunk])
                await asyncio.wait_for(asyncio.gather(*(future for _, future, _ in sent)),
                                       timeout=self.delivery_timeout_s)
            except FAILURES as err:
                log.warning("kafka: replay interrupted: %s", err)
                await self._disconnect()
                return False
            self.spool.ack(chunk)
            self._delivered([record for record, _, _ in chunk])
            self.stats.replayed += len(chunk)
            self._to_spool(list(self.pending))  # new records queue behind the spool
            self.pending.clear()
        log.info("kafka: spool replayed")
        return True

    async def run(self) -> None:
        retry_at = 0.0
        while True:
            if not self.up:
                connected = time.monotonic() >= retry_at and await self._connect()
                if not connected:
                    # Kafka is away: what waits in memory goes to disk, in order.
                    self._to_spool(list(self.pending))
                    self.pending.clear()
                    if self._closing:
                        return
                    if time.monotonic() >= retry_at:
                        retry_at = time.monotonic() + 1.0
                    await self._wait(retry_at - time.monotonic())
                    continue
            if len(self.spool) and not await self._replay():
                retry_at = time.monotonic() + 1.0
                continue
            try:
                if self.pending and self.inflight_records < self.max_in_flight \
                        and self._lingering() == 0.0:
                    records = list(self.pending)
                    self.pending.clear()
                    for entry in await self._send(records):
                        self.inflight.append(entry)
                        self.inflight_records += len(entry[0])
            except FAILURES as err:
                log.warning("kafka: send refused (%s)", err)
                self.pending.extendleft(reversed(records))
                await self._outage()
                retry_at = time.monotonic() + 1.0
                continue
            if not self._reap():
                await self._outage()
                retry_at = time.monotonic() + 1.0
                continue
            if self._closing and not self.pending:
                if not self.inflight:
                    return
                await self._wait(self._overdue_in())
                continue
            timeout = self._lingering() if self.pending else 1.0
            if self.inflight:
                timeout = min(timeout, self._overdue_in())
            await self._wait(timeout)

    async def _wait(self, timeout: float) -> None:
        """Sleep until woken (new records, a delivery) or `timeout`; no task per call."""
        self._wake.clear()
        if self.pending and self.up and self.inflight_records < self.max_in_flight \
                and self._lingering() == 0.0:
            return
        timer = asyncio.get_running_loop().call_later(max(timeout, 0.0), self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    async def close(self, task: asyncio.Task, timeout: float = 30.0) -> None:
        """Deliver what can be delivered within `timeout`; the rest stays in the spool."""
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._disconnect()
        self._to_spool(self._unacknowledged() + list(self.pending))
        self.pending.clear()
        self.spool.close()
