"""Step and kernel events from a training process to Kafka, off the training thread.

The agent's shipper (idempotent producer, disk spool while Kafka is away) runs on its own
event loop in a daemon thread; training only hands records over. A worker killed with
SIGKILL loses at most the records not yet in the spool or acknowledged; a restart
replays its spool (one folder per rank).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from mlpe.agent.agent import train_step_records
from mlpe.agent.shipper import Shipper
from mlpe.agent.spool import Record, Spool
from mlpe.common.topics import KERNEL_EVENTS
from mlpe.v1 import training_pb2


class Publisher:
    def __init__(self, bootstrap: str, spool_dir: Path):
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

    def _submit(self, records: list[Record]) -> None:
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
