"""Acknowledge consumed events only once their data is in InfluxDB, in offset order.

A metric batch or training step is acknowledged (so its offset may be committed) only
when every window it contributed to has been written. A killed worker therefore
resumes from data whose windows were not yet written, recomputes those windows and
overwrites them (same series, same timestamp): nothing missing, nothing doubled.

Windows close out of order (a 1 s window before the 10 s one, one device's before
another's), but Faust commits the highest acknowledged offset of a partition, even
past an earlier event that is still held (faust-streaming#312). So acks go out
contiguously: an event is acknowledged only when it and every earlier event of its
partition are released. No Faust here: an event is anything with `.message.topic`,
`.message.partition` and `.ack()`.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

Partition = tuple[str, int]  # (topic, partition number)


class Hold:
    """One consumed event, held by `refs` windows; acknowledged when the last of them
    releases it and every earlier event of its partition is acknowledged."""

    __slots__ = ("event", "queue", "refs")

    def __init__(self, event, queue: deque[Hold]):
        self.event, self.queue, self.refs = event, queue, 0

    def release(self) -> None:
        self.refs -= 1
        if self.refs <= 0:
            while self.queue and self.queue[0].refs <= 0:
                self.queue.popleft().event.ack()

    def ack_if_unheld(self) -> None:
        """Acknowledge (in order) an event that no window took: it joins none, or all
        its samples fell in windows already written."""
        if self.refs == 0:
            self.refs = 1
            self.release()


class AckQueues:
    """Per partition, the consumed events not yet acknowledged, in offset order."""

    def __init__(self) -> None:
        self.queues: dict[Partition, deque[Hold]] = {}

    def hold(self, event) -> Hold:
        """A hold on `event`, queued behind the earlier events of its partition; the
        caller counts in `refs` the windows that took its data, then calls
        `ack_if_unheld` in case none did."""
        message = event.message
        queue = self.queues.setdefault((message.topic, message.partition), deque())
        hold = Hold(event, queue)
        queue.append(hold)
        return hold

    def ack_in_order(self, event) -> None:
        """Acknowledge an event that joins no window, after the earlier ones of its
        partition."""
        self.hold(event).ack_if_unheld()

    def drop(self, partitions: set[Partition]) -> None:
        """Forget the queues of revoked partitions: their new owner replays the events
        still held from the last commit."""
        for partition in partitions:
            self.queues.pop(partition, None)


class Offset(NamedTuple):
    topic: str
    partition: int
    offset: int


class Consumed:
    """A record of a plain Kafka consumer as an event for AckQueues: acknowledging it
    makes its partition committable up to it. Acks come in offset order (AckQueues), so
    `committable` only moves forward. Only the record's place is kept, not its value:
    events are held until their minute is written (rollup.py), a minute of messages."""

    __slots__ = ("acked", "committable", "message")

    def __init__(self, record, committable: dict[Partition, int]):
        self.message = Offset(record.topic, record.partition, record.offset)
        self.acked, self.committable = False, committable

    def ack(self) -> None:
        self.acked = True
        self.committable[(self.message.topic, self.message.partition)] = \
            self.message.offset + 1
