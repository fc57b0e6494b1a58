"""Gets records to Kafka, or to the disk spool while Kafka is away, in order.

Records go straight to an idempotent, acks=all, compressed aiokafka producer
while Kafka answers. On the first failed delivery the shipper waits for what is
in flight, spools the failures and everything after them, and from then on
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

from mlpe.agent.spool import Record, Spool

log = logging.getLogger(__name__)


@dataclass
class ShipperStats:
    sent: int = 0          # records acknowledged by Kafka
    spooled: int = 0       # records that went through the spool
    outages: int = 0
    acked_bytes: int = 0


class Shipper:
    def __init__(self, bootstrap: str, spool: Spool, *, compression: str = "lz4",
                 max_in_flight: int = 20_000, request_timeout_ms: int = 10_000,
                 linger_ms: int = 5):
        self.bootstrap = bootstrap
        self.spool = spool
        self.compression = compression
        self.max_in_flight = max_in_flight
        self.request_timeout_ms = request_timeout_ms
        self.linger_ms = linger_ms
        self.stats = ShipperStats()
        self.pending: deque[Record] = deque()
        self.inflight: deque[tuple[Record, asyncio.Future]] = deque()
        self.producer: AIOKafkaProducer | None = None
        self.up = False
        self._wake = asyncio.Event()
        self._closing = False

    def submit(self, records: list[Record]) -> None:
        """Queue records (event-loop thread only; the sampler uses call_soon_threadsafe)."""
        self.pending.extend(records)
        self._wake.set()

    async def _connect(self) -> bool:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=True,
            acks="all",
            compression_type=self.compression,
            linger_ms=self.linger_ms,
            max_batch_size=1 << 20,
            request_timeout_ms=self.request_timeout_ms,
        )
        try:
            await asyncio.wait_for(producer.start(), timeout=self.request_timeout_ms / 1000)
        except (KafkaError, OSError, TimeoutError) as err:
            await producer.stop()
            log.debug("kafka not reachable at %s: %s", self.bootstrap, err)
            return False
        self.producer, self.up = producer, True
        log.info("kafka: connected to %s", self.bootstrap)
        return True

    async def _disconnect(self) -> None:
        producer, self.producer, self.up = self.producer, None, False
        if producer is not None:
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                await asyncio.wait_for(producer.stop(), timeout=5)

    def _send(self, record: Record) -> asyncio.Future:
        return asyncio.ensure_future(
            self.producer.send(record.topic, record.value, key=record.key))

    async def _settle_inflight(self) -> list[Record]:
        """Wait for every in-flight send; return the records that were not delivered."""
        failed: list[Record] = []
        while self.inflight:
            record, future = self.inflight.popleft()
            try:
                await (await future)
                self.stats.sent += 1
                self.stats.acked_bytes += len(record.value)
            except (KafkaError, OSError, TimeoutError) as err:
                if not failed:
                    log.warning("kafka: delivery failed (%s); spooling to %s", err, self.spool.dir)
                failed.append(record)
        return failed

    async def _reap(self) -> bool:
        """Collect finished sends in order; False at the first failure."""
        while self.inflight and self.inflight[0][1].done():
            record, future = self.inflight[0]
            try:
                delivery = future.result()
            except (KafkaError, OSError, TimeoutError):
                return False
            if not delivery.done():
                break
            if delivery.exception() is not None:
                return False
            self.inflight.popleft()
            self.stats.sent += 1
            self.stats.acked_bytes += len(record.value)
        return True

    async def _outage(self) -> None:
        """Kafka failed: keep order by moving failures, then everything newer, to the spool."""
        failed = await self._settle_inflight()
        records = failed + list(self.pending)
        self.pending.clear()
        self.spool.append(records)
        self.stats.spooled += len(records)
        self.stats.outages += 1
        await self._disconnect()

    async def _replay(self) -> bool:
        """Send the spool, oldest first, in chunks acknowledged before removal."""
        while len(self.spool):
            chunk = self.spool.peek(2000)
            futures = [self._send(record) for record, _, _ in chunk]
            delivered = 0
            for future in futures:
                try:
                    await (await future)
                    delivered += 1
                except (KafkaError, OSError, TimeoutError) as err:
                    log.warning("kafka: replay interrupted: %s", err)
                    break
            self.spool.ack(chunk[:delivered])
            self.stats.sent += delivered
            if delivered < len(chunk):
                for future in futures[delivered:]:
                    future.cancel()
                await self._disconnect()
                return False
            if self.pending:  # new records queue behind the spool, never beside it
                self.spool.append(list(self.pending))
                self.stats.spooled += len(self.pending)
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
                    if self.pending:
                        self.spool.append(list(self.pending))
                        self.stats.spooled += len(self.pending)
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
            while self.pending and len(self.inflight) < self.max_in_flight:
                record = self.pending.popleft()
                self.inflight.append((record, self._send(record)))
            if not await self._reap():
                await self._outage()
                retry_at = time.monotonic() + 1.0
                continue
            if self._closing and not self.pending:
                ok = not await self._settle_inflight_or_spool()
                if ok or not self.up:
                    return
            await self._wait(0.05 if self.inflight else 1.0)

    async def _settle_inflight_or_spool(self) -> bool:
        failed = await self._settle_inflight()
        if failed:
            self.spool.append(failed)
            self.stats.spooled += len(failed)
            await self._disconnect()
        return bool(failed)

    async def _wait(self, timeout: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.0))

    async def close(self, task: asyncio.Task, timeout: float = 30.0) -> None:
        """Deliver what can be delivered within `timeout`; the rest stays in the spool."""
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=timeout)
        except TimeoutError:
            task.cancel()
            leftover = [r for r, f in self.inflight if not (f.done() and not f.exception())]
            self.spool.append(leftover + list(self.pending))
            self.inflight.clear()
            self.pending.clear()
        await self._disconnect()
        self.spool.close()
