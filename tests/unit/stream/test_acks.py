"""Acks go out contiguously per partition, whatever order the windows are written in."""

from types import SimpleNamespace

import numpy as np

from mlpe.common import batches
from mlpe.stream.acks import AckQueues
from mlpe.stream.windows import WindowSet
from mlpe.v1 import metrics_pb2 as pb


class Event:
    """What AckQueues needs of a Faust event: its message's place, and ack()."""

    def __init__(self, acked: list, offset: int, partition: int = 0, topic: str = "t"):
        self.message = SimpleNamespace(topic=topic, partition=partition, offset=offset)
        self.acked = acked

    def ack(self) -> None:
        self.acked.append((self.message.topic, self.message.partition, self.message.offset))


def held(queues: AckQueues, event: Event, windows: int):
    hold = queues.hold(event)
    hold.refs += windows
    return hold


def test_out_of_order_releases_ack_contiguously():
    acked: list = []
    queues = AckQueues()
    first, second, third = (held(queues, Event(acked, n), windows=2) for n in range(3))
    third.release()
    third.release()
    second.release()
    assert acked == []  # 0 still held: nothing after it may be acked
    first.release()
    assert acked == []  # held by its second window
    second.release()
    assert acked == []
    first.release()
    assert acked == [("t", 0, 0), ("t", 0, 1), ("t", 0, 2)]
    assert list(queues.queues[("t", 0)]) == []


def test_an_event_no_window_took_waits_for_the_earlier_ones():
    acked: list = []
    queues = AckQueues()
    first = held(queues, Event(acked, 0), windows=1)
    queues.ack_in_order(Event(acked, 1))  # e.g. a dead letter
    held(queues, Event(acked, 2), windows=0).ack_if_unheld()  # all its windows were written
    assert acked == []
    first.release()
    assert acked == [("t", 0, 0), ("t", 0, 1), ("t", 0, 2)]


def test_partitions_are_independent():
    acked: list = []
    queues = AckQueues()
    blocked = held(queues, Event(acked, 0, partition=0), windows=1)
    queues.ack_in_order(Event(acked, 7, partition=1))
    queues.ack_in_order(Event(acked, 0, topic="other"))
    assert acked == [("t", 1, 7), ("other", 0, 0)]
    blocked.release()
    assert acked[-1] == ("t", 0, 0)


def test_a_revoked_partition_drops_its_queue():
    acked: list = []
    queues = AckQueues()
    held(queues, Event(acked, 0, partition=0), windows=1)
    kept = held(queues, Event(acked, 0, partition=1), windows=1)
    queues.drop({("t", 0), ("t", 5)})  # 5 was never seen: nothing to drop
    assert set(queues.queues) == {("t", 1)}
    # Owned again later: a fresh queue, not blocked by the event the old owner held.
    queues.ack_in_order(Event(acked, 3, partition=0))
    assert acked == [("t", 0, 3)]
    kept.release()
    assert acked == [("t", 0, 3), ("t", 1, 0)]


def test_windows_release_their_holds_when_written():
    """The app's use: a hold per event, one ref per window that took its samples."""
    t0 = 1_700_000_000 * 10**9
    acked: list = []
    queues = AckQueues()
    windows = [WindowSet(1.0, 0.0, 60), WindowSet(10.0, 0.0, 60)]
    for n in range(12):  # one batch per second, 12 s: the 10 s window stays open
        times = t0 + n * 10**9 + np.arange(10, dtype=np.int64) * 10**8
        batch = batches.Batch("n", pb.DEVICE_KIND_GPU, 0, "", 1, n, 0, times,
                              {pb.GPU_POWER: np.ones(10)})
        hold = queues.hold(Event(acked, n))
        for w in windows:
            hold.refs += w.add(("t", 0), batch, hold)
        hold.ack_if_unheld()
    for w in windows:
        for window in w.close_ready():
            for token in window.tokens:
                token.release()
    # The 1 s windows of 0..10 and the 10 s window of 0..9 are written; 10 is still
    # in the open 10 s window [10, 20) s, so nothing from it on may be acked.
    assert [offset for _, _, offset in acked] == list(range(10))
