"""The stream app's side of the placement join, in Faust's test context (no Kafka):
placement records in, refused ones dead-lettered, GPU batches tagged where decoded."""

import asyncio
import time

import numpy as np
import pytest
from aiokafka import TopicPartition

from mlpe.common import batches
from mlpe.common.settings import load
from mlpe.common.topics import GPU_METRICS, PLACEMENT
from mlpe.stream.app import StreamApp
from mlpe.v1 import metrics_pb2 as pb
from mlpe.v1.training_pb2 import JobPlacement, RankProcess
from tests.helpers import kafka_record

START_NS = (time.time_ns() - 3600 * 10**9) // 10**10 * 10**10  # an hour ago, on a 10 s mark


@pytest.fixture()
def stream(tmp_path, monkeypatch) -> StreamApp:
    app = StreamApp(load({"MLPE_STATE_DIR": str(tmp_path / "state"),
                          "MLPE_INFLUX_TOKEN": "unit-test-token", "MLPE_RULES": ""}))
    refused: list[tuple[object, str]] = []

    async def refuse(message, reason):
        refused.append((message, reason))

    monkeypatch.setattr(app, "refuse", refuse)
    app.refused = refused
    app.app.finalize()
    app.app.flow_control.resume()
    return app


def record(value: bytes | None, key: bytes = b"n1/job-p", offset: int = 0):
    return kafka_record(PLACEMENT.name, value, offset=offset, key=key)


def metrics(value: bytes, offset: int = 0):
    return kafka_record(GPU_METRICS.name, value, offset=offset, key=b"n1")


def placed(pids=(4242,), ended=False) -> bytes:
    return JobPlacement(job_id="job-p", node_id="n1", time_ns=START_NS, ended=ended, ranks=[
        RankProcess(rank=i, local_rank=i, pid=p) for i, p in enumerate(pids)]
    ).SerializeToString()


def gpu_batch(tenth: int, pids=()) -> bytes:
    times = START_NS + tenth * 10**8 + np.arange(10, dtype=np.int64) * 10**7
    events = [pb.DeviceEvent(time_ns=int(times[0]), kind=pb.EVENT_PROCESS_MEMORY, code=pid,
                             value=60_000.0) for pid in pids]
    return batches.encode(batches.Batch("n1", pb.DEVICE_KIND_GPU, 0, "", 1, tenth, tenth * 10,
                                        times, {pb.GPU_UTIL: np.full(10, 90.0)},
                                        events=events))


async def test_malformed_placements_are_refused_and_the_good_ones_applied(stream):
    await stream.take_placement(record(b"\xff\xff garbage", offset=0))
    await stream.take_placement(record(placed(), key=b"n1/other-job", offset=1))
    await stream.take_placement(record(placed(), offset=2))
    assert [(r.offset, reason.split(":")[0]) for r, reason in stream.refused] == [
        (0, "not a JobPlacement"), (1, "JobPlacement")]
    assert stream.state.placements.pids == {"n1": {4242: "job-p"}}
    assert stream.state.counters["placements"] == 1
    await stream.take_placement(record(None))  # a tombstone forgets the key
    assert stream.state.placements.pids == {}


async def test_aggregate_tags_gpu_batches_with_the_placed_job(stream, monkeypatch):
    written: list[str] = []

    async def write(lines):
        written.extend(lines)

    async def send_second(key, value):
        pass

    monkeypatch.setattr(stream.writer, "write", write)
    monkeypatch.setattr(stream.gpu_seconds, "send", send_second)
    await stream.take_placement(record(placed()))
    await stream.take_metrics(metrics(gpu_batch(0, pids=[4242])))
    for tenth in range(1, 15):  # no events in these: the job last learned
        await stream.take_metrics(metrics(gpu_batch(tenth), offset=tenth))
    for windows in stream.state.windows:
        for window in windows.close_ready(flush_all=True):
            written.extend(window.lines)
    gpu_lines = [line.split(" ")[0] for line in written if line.startswith("gpu,")]
    assert gpu_lines == ["gpu,node=n1,window=1s,gpu=0,job=job-p"] * 2 + [
        "gpu,node=n1,window=10s,gpu=0,job=job-p"]


class FakeConsumer:
    """getmany hands out `records` once, then nothing (an aiokafka consumer's surface)."""

    def __init__(self, records):
        self.records, self.fetched, self.drained = records, asyncio.Event(), asyncio.Event()
        self.tp = TopicPartition(GPU_METRICS.name, 0)

    async def getmany(self, timeout_ms, max_records):
        if self.records:
            out, self.records = {self.tp: self.records}, []
            self.fetched.set()
            return out
        if self.fetched.is_set():
            self.drained.set()
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    def assignment(self):
        return {self.tp}

    async def commit(self, offsets):
        pass


async def test_aggregate_waits_for_the_placements_to_be_read(stream, monkeypatch):
    monkeypatch.setattr(stream, "write_once", lambda: None)
    await stream.app.on_partitions_assigned.send(set())  # a worker got partitions
    loaded = stream.state.placements_loaded
    assert loaded is not None and not loaded.is_set()
    consumer = FakeConsumer([metrics(gpu_batch(0, pids=[4242]))])
    reading = asyncio.create_task(stream.read_metrics(consumer))
    await consumer.fetched.wait()
    await asyncio.sleep(0.2)
    assert stream.state.counters["batches"] == 0  # held until the placements are in
    await stream.take_placement(record(placed()))
    loaded.set()
    await consumer.drained.wait()
    reading.cancel()
    assert stream.state.counters["batches"] == 1
    assert stream.state.placements.gpus == {("n1", 0): ("job-p", START_NS)}
