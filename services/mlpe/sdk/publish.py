"""Step and kernel events from a training process to Kafka, off the training thread.

The agent's shipper (idempotent producer, disk spool while Kafka is away) runs on its own
event loop in a daemon thread; training only hands records over; a restart replays the
rank's spool (one folder per rank).

A SIGKILL still loses what the shipper held in memory — records lingering before a send
or sent but not yet acknowledged, ~100 ms of steps. Steps after the newest checkpoint
are done again after a restart, but steps before it are not, so their events would be
gone for good (the recovery benchmark caught it: a loss curve with holes). Hence a
journal: every record is appended to `<spool>.journal` before it is handed over (a
write(2), no fsync: it survives the process, which is what a kill takes), and
`<spool>.settled` says how many of them are acknowledged or spooled. The next process of
the rank re-sends the unsettled records of steps up to the checkpoint it resumed from
(`republish`); a few may arrive twice, with equal contents.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from pathlib import Path

from mlpe.agent.agent import train_step_records
from mlpe.agent.shipper import Shipper
from mlpe.agent.spool import Record, Spool
from mlpe.common.topics import KERNEL_EVENTS, TRAIN_EVENTS
from mlpe.v1 import training_pb2

JOURNAL_ROTATE_BYTES = 4 << 20
_HEADER = struct.Struct("<BHI")  # topic (0 train, 1 kernel), key length, value length
_TOPICS = (TRAIN_EVENTS.name, KERNEL_EVENTS.name)


def frame(records: list[Record]) -> bytes:
    """Records as journal bytes (read back by read_journal)."""
    return b"".join(_HEADER.pack(_TOPICS.index(r.topic), len(r.key), len(r.value)) +
                    r.key + r.value for r in records)


def read_journal(path: Path) -> list[Record]:
    """The records of a journal, up to the first torn one (a kill mid-write)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    records, at = [], 0
    while at + _HEADER.size <= len(data):
        topic, key_len, value_len = _HEADER.unpack_from(data, at)
        end = at + _HEADER.size + key_len + value_len
        if topic >= len(_TOPICS) or end > len(data):
            break
        key = data[at + _HEADER.size:at + _HEADER.size + key_len]
        records.append(Record(_TOPICS[topic], key, data[end - value_len:end]))
        at = end
    return records


def _last_step(record: Record) -> int:
    if record.topic == TRAIN_EVENTS.name:
        return training_pb2.TrainStep.FromString(record.value).step
    return training_pb2.KernelSummary.FromString(record.value).last_step


class Publisher:
    def __init__(self, bootstrap: str, spool_dir: Path):
        spool_dir = Path(spool_dir)
        spool_dir.parent.mkdir(parents=True, exist_ok=True)
        self.journal_path = spool_dir.with_name(spool_dir.name + ".journal")
        self.settled_path = spool_dir.with_name(spool_dir.name + ".settled")
        self.unsettled = self._previous_unsettled()
        self.journal = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                               0o644)
        self.settled = os.open(self.settled_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                               0o644)
        self.journaled = self.journal_bytes = self.settled_base = 0
        self.shipper = Shipper(bootstrap, Spool(spool_dir, max_bytes=64 << 20),
                               linger_ms=100)
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.thread.start()
        self.started.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.task = self.loop.create_task(self.shipper.run())
        self.loop.call_soon(self.started.set)
        self.loop.run_forever()

    def step(self, event: training_pb2.TrainStep) -> None:
        self._submit(train_step_records([event]))

    def kernels(self, summary: training_pb2.KernelSummary) -> None:
        self._submit([Record(KERNEL_EVENTS.name, summary.job_id.encode(),
                             summary.SerializeToString())])

    def _previous_unsettled(self) -> list[Record]:
        """The previous process's journal records its shipper never settled."""
        records = read_journal(self.journal_path)
        try:
            settled = struct.unpack("<Q", self.settled_path.read_bytes()[:8])[0]
        except (OSError, struct.error):
            settled = 0
        return records[settled:]

    def republish(self, up_to_step: int) -> int:
        """Send again what the previous process of this rank may have lost, for the steps
        that will not be done again (≤ the checkpoint resumed from). Returns how many."""
        again = [r for r in self.unsettled if _last_step(r) <= up_to_step]
        self.unsettled = []
        if again:
            self._submit(again)
        return len(again)

    def _submit(self, records: list[Record]) -> None:
        settled = self.shipper.stats.settled - self.settled_base  # read across threads:
        # an int that only grows, so a stale value only means a few records re-sent
        if self.journal_bytes > JOURNAL_ROTATE_BYTES and settled >= self.journaled:
            os.ftruncate(self.journal, 0)  # everything in it is safe: start over
            self.settled_base += settled
            self.journaled = self.journal_bytes = settled = 0
        chunk = frame(records)
        os.write(self.journal, chunk)
        self.journaled += len(records)
        self.journal_bytes += len(chunk)
        os.pwrite(self.settled, struct.pack("<Q", settled), 0)
        self.loop.call_soon_threadsafe(self.shipper.submit, records)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered within `timeout`; the rest stays spooled."""
        done = asyncio.run_coroutine_threadsafe(self.shipper.close(self.task, timeout),
                                                self.loop)
        try:
            done.result(timeout + 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            settled = self.shipper.stats.settled - self.settled_base
            os.pwrite(self.settled, struct.pack("<Q", settled), 0)
            os.close(self.journal)
            os.close(self.settled)
