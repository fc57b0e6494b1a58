"""The stream processor end to end: agent → Kafka → `mlpe stream` → InfluxDB, dead letters,
and a kill -9 mid-run that leaves no window missing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
import weakref

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2

from mlpe.agent.agent import Agent
from mlpe.agent.scenario import Scenario
from mlpe.agent.shipper import Shipper
from mlpe.agent.sources.sim import SimulatedGpus
from mlpe.agent.spool import Spool
from mlpe.common import batches
from mlpe.common.kafka import wait_stream_ready
from mlpe.common.topics import (
    ALERTS,
    DEAD_LETTER,
    GPU_METRICS,
    KERNEL_EVENTS,
    TRAIN_EVENTS,
    metrics_group,
)
from mlpe.v1 import deadletter_pb2
from mlpe.v1 import metrics_pb2 as pb
from mlpe.v1.alerts_pb2 import ALERT_FIRING, Alert
from mlpe.v1.training_pb2 import KernelSummary, TrainStep
from tests.helpers import mlpe_env, parsed, start_mlpe, stop_child, stop_gracefully, tail

# Tests that start `mlpe stream` go in two groups, each on one pytest worker: every
# stream worker reads all of mlpe.metrics.*, so many at once would each do the work of
# all (every test's fleet is a job of its own, so none judges another's GPUs).
pytestmark = pytest.mark.xdist_group("stream-b")


def start_stream(unique: str, log_path) -> subprocess.Popen:
    # "latest": the group is ready (below) before the test's data flows, and earlier
    # tests' data is not replayed. A restart says "latest" too, after `wait_committed`:
    # the partitions with the test's data resume from their commits; "earliest" would
    # also replay the whole history of every partition without one.
    env = mlpe_env(MLPE_STREAM_APP_ID=f"test-stream-{unique}", MLPE_STREAM_START="latest",
                   MLPE_STATE_DIR=str(log_path.parent / "state"), MLPE_LOG_LEVEL="info",
                   MLPE_INFLUX_TOKEN=os.environ["MLPE_TEST_INFLUX_TOKEN"])
    stream = start_mlpe("stream", env=env, log=log_path)
    # Ready = the worker's consumer group is Stable with it as a member.
    try:
        wait_stream_ready(env["MLPE_KAFKA_BOOTSTRAP"], env["MLPE_STREAM_APP_ID"], 1, [stream])
    except BaseException:
        stop_child(stream, timeout=0)  # never leave a worker behind
        raise
    return stream


def stop(stream: subprocess.Popen) -> None:
    stop_gracefully(stream, "the stream worker")


def partitions_of(keys: list[str], topic=GPU_METRICS) -> set[int]:
    """The partitions these keys go to (the agent's shipper partitions as Kafka does)."""
    return {(murmur2(k.encode()) & 0x7FFFFFFF) % topic.partitions for k in keys}


async def wait_committed(bootstrap: str, group: str, partitions: set[int], timeout=120.0,
                         topic=GPU_METRICS) -> None:
    """Until the stream app has committed an offset on each of these partitions (which
    can take a minute and more: events are held until their 1 min window is written)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            offsets = await admin.list_consumer_group_offsets(group)
            done = {tp.partition for tp, meta in offsets.items()
                    if tp.topic == topic.name and meta.offset >= 0}
            if partitions <= done:
                return
            assert time.monotonic() < deadline, f"no commit on partitions {partitions - done}"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


@pytest.fixture
def stream_env(stack_endpoints, monkeypatch):
    monkeypatch.setenv("MLPE_TEST_INFLUX_TOKEN", stack_endpoints.influx_token)
    monkeypatch.setenv("MLPE_KAFKA_BOOTSTRAP", stack_endpoints.kafka_bootstrap)
    monkeypatch.setenv("MLPE_INFLUX_URL", stack_endpoints.influx_url)
    return stack_endpoints


def windows(e, prefix: str) -> dict[tuple[str, str, int], int]:
    """{(node, gpu, window start s): samples} of the 1 s GPU windows of nodes `prefix…`."""
    with e.influx() as client:
        tables = client.query_api().query(f'''
            from(bucket: "{e.bucket_of('1s')}") |> range(start: -1h)
              |> filter(fn: (r) => r._measurement == "gpu" and r.window == "1s"
                                   and strings.hasPrefix(v: r.node, prefix: "{prefix}")
                                   and r._field == "samples")
        '''.replace("from(", 'import "strings"\nfrom(', 1))
    return {(r["node"], r["gpu"], int(r.get_time().timestamp())): int(r.get_value())
            for t in tables for r in t.records}


async def run_agent(bootstrap: str, tmp_path, prefix: str, seconds: float) -> Agent:
    sim = SimulatedGpus(Scenario(seed=3, nodes=2, gpus_per_node=2), 100, node_prefix=prefix)
    agent = Agent([(sim, 100)], Shipper(bootstrap, Spool(tmp_path / "spool")), hz=100,
                  job_id=f"{prefix}job")  # its own peer group, apart from other tests'
    await agent.run(duration_s=seconds)
    return agent


def complete_interior(found: dict, prefix: str) -> tuple[int, list]:
    """Every full second between each device's first and last window holds 100 samples."""
    by_device: dict[tuple[str, str], dict[int, int]] = {}
    for (node, gpu, second), samples in found.items():
        by_device.setdefault((node, gpu), {})[second] = samples
    problems = []
    for device, seconds in by_device.items():
        first, last = min(seconds), max(seconds)
        for s in range(first + 1, last):
            if seconds.get(s) != 100:
                problems.append((device, s - first, seconds.get(s), last - first))
    return len(by_device), problems


async def wait_for(condition, timeout: float, what: str, stream=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stream is not None and stream.poll() is not None:
            raise AssertionError(f"the stream worker exited ({stream.returncode}) while "
                                 f"waiting for {what}")
        result = condition()
        if result:
            return result
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


async def test_aggregates_reach_influxdb(stream_env, unique, tmp_path):
    prefix = f"s{unique}-"
    stream = start_stream(unique, tmp_path / "stream.log")
    try:
        await run_agent(stream_env.kafka_bootstrap, tmp_path, prefix, seconds=6)
        found = await wait_for(lambda: len(windows(stream_env, prefix)) >= 4 * 6 and
                               windows(stream_env, prefix), 60, "1 s windows in InfluxDB", stream)
        devices, problems = complete_interior(found, prefix)
        assert devices == 4 and problems == []
        # Its internal topic existed before it subscribed (a race there left the peer
        # detectors without input until the next rebalance).
        assert "Ignoring missing topic" not in (tmp_path / "stream.log").read_text()
    finally:
        stop(stream)


async def test_kill_9_mid_run_leaves_no_window_missing(stream_env, unique, tmp_path):
    prefix = f"k{unique}-"
    log = tmp_path / "stream.log"
    stream = start_stream(unique, log)
    agent_task = asyncio.create_task(
        run_agent(stream_env.kafka_bootstrap, tmp_path, prefix, seconds=20))
    try:
        await wait_for(lambda: len(windows(stream_env, prefix)) >= 8, 60, "first windows", stream)
        await wait_committed(stream_env.kafka_bootstrap, metrics_group(f"test-stream-{unique}"),
                             partitions_of([f"{prefix}00", f"{prefix}01"]))
        os.kill(stream.pid, signal.SIGKILL)
        stream.wait()
        stream = start_stream(unique, log)  # resumes from the last commits
        await agent_task
        ended = int(time.time())
        await wait_for(lambda: max((s for *_, s in windows(stream_env, prefix)), default=0)
                       >= ended - 2, 90, "windows up to the end of the run", stream)
        devices, problems = complete_interior(windows(stream_env, prefix), prefix)
        assert devices == 4 and problems == [], log.read_text()[-2000:]
    finally:
        stop(stream)


# Per consumer, the dead letters read but not returned yet: one fetch often holds several,
# and returning the first used to drop the rest (the next wait for one of them timed out).
_UNREAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def next_dead_letter(consumer, wanted, timeout: float = 60.0):
    """The first dead letter `wanted(letter)` accepts, read from `consumer`."""
    unread = _UNREAD.setdefault(consumer, [])
    async with asyncio.timeout(timeout):
        while True:
            for i, letter in enumerate(unread):
                if wanted(letter):
                    return unread.pop(i)
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                unread += [deadletter_pb2.DeadLetter.FromString(r.value) for r in records]


async def reading(e, producer, warm_prefix: str, key: str) -> None:
    """Until the worker reads the metrics partition of `key`: a node of that partition
    has a window in InfluxDB. A group Stable is not enough: messages sent before the
    worker's "latest" position is set are skipped (seen 1 run in 5 on a loaded machine)."""
    warm = next(f"{warm_prefix}{i}" for i in range(1000)
                if partitions_of([f"{warm_prefix}{i}"]) == partitions_of([key]))
    for seq in range(30):  # one 2 s batch a try: one sent before the position is lost
        times = time.time_ns() + np.arange(200, dtype=np.int64) * 10**7
        await producer.send_and_wait(GPU_METRICS.name, batches.encode(batches.Batch(
            warm, pb.DEVICE_KIND_GPU, 0, "", 1, seq, seq * 200, times,
            {pb.GPU_UTIL: np.ones(200)})), key=warm.encode())
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: windows(e, warm_prefix), 4, "the warm node")
            return
    raise AssertionError("the warm node's windows never reached InfluxDB")


async def test_garbage_goes_to_dead_letters_and_processing_goes_on(stream_env, unique,
                                                                   tmp_path):
    prefix = f"d{unique}-"
    stream = start_stream(unique, tmp_path / "stream.log")
    consumer = await tail(stream_env.kafka_bootstrap, DEAD_LETTER)
    producer = AIOKafkaProducer(bootstrap_servers=stream_env.kafka_bootstrap)
    await producer.start()
    try:
        garbage_key = f"{prefix}garbage".encode()
        await reading(stream_env, producer, f"w{unique}-", garbage_key.decode())
        await producer.send_and_wait(GPU_METRICS.name, b"\x08\x96\x01 not a batch",
                                     key=garbage_key)
        letter = await next_dead_letter(consumer, lambda d: d.key == garbage_key)
        assert letter.source_topic == GPU_METRICS.name and letter.refused_by == "stream"
        assert letter.value == b"\x08\x96\x01 not a batch" and letter.reason
        # A step event that parses but cannot be true is refused the same way.
        bad_step = TrainStep(job_id=f"{prefix}job", rank=5, world_size=2, step=1,
                             time_ns=time.time_ns()).SerializeToString()
        await producer.send_and_wait(TRAIN_EVENTS.name, bad_step, key=f"{prefix}job".encode())
        letter = await next_dead_letter(consumer, lambda d: d.value == bad_step)
        assert letter.source_topic == TRAIN_EVENTS.name
        assert "rank 5 does not fit world_size 2" in letter.reason
        await run_agent(stream_env.kafka_bootstrap, tmp_path, prefix, seconds=3)
        await wait_for(lambda: windows(stream_env, prefix), 60, "windows after the garbage", stream)
        assert stream.poll() is None
    finally:
        await producer.stop()
        await consumer.stop()
        stop(stream)


def kernel_points(e, job: str) -> dict[tuple[str, str, str], dict]:
    """{(rank, op, direction): {field: value}} of the `kernel` points of `job`."""
    with e.influx() as client:
        tables = client.query_api().query(f'''
            from(bucket: "{e.influx_bucket}") |> range(start: -1h)
              |> filter(fn: (r) => r._measurement == "kernel" and r.job == "{job}")''')
    points: dict = {}
    for t in tables:
        for r in t.records:
            points.setdefault((r["rank"], r["op"], r["direction"]), {})[r.get_field()] = \
                r.get_value()
    return points


async def test_kernel_summaries_become_kernel_points_and_bad_ones_dead_letters(
        stream_env, unique, tmp_path):
    job = f"k{unique}-job"
    stream = start_stream(unique, tmp_path / "stream.log")
    consumer = await tail(stream_env.kafka_bootstrap, DEAD_LETTER)
    producer = AIOKafkaProducer(bootstrap_servers=stream_env.kafka_bootstrap)
    await producer.start()

    def summary(job_id: str, rank: int, p99: float = 0.4) -> bytes:
        msg = KernelSummary(job_id=job_id, rank=rank, first_step=1, last_step=10,
                            time_ns=time.time_ns(), backend="reference")
        msg.kernels.add(op="rmsnorm", direction="forward", calls=20, total_ms=4.0,
                        p50_ms=0.2, p99_ms=p99, max_ms=0.5, bytes_moved=1e6)
        msg.kernels.add(op="swiglu", direction="backward", calls=10, total_ms=3.0,
                        p50_ms=0.3, p99_ms=0.35, max_ms=0.4)
        return msg.SerializeToString()

    bad = {b"\xff\x00 not a summary": "not a KernelSummary",
           summary(f"{job}\nkernel,job=x calls=1i", 0): "job_id",
           summary(job, 2, p99=float("nan")): "must be finite"}
    try:
        for raw in bad:
            await producer.send_and_wait(KERNEL_EVENTS.name, raw, key=job.encode())
        for rank in (0, 1):
            await producer.send_and_wait(KERNEL_EVENTS.name, summary(job, rank),
                                         key=job.encode())
        for raw, reason in bad.items():
            letter = await next_dead_letter(consumer, lambda d, raw=raw: d.value == raw)
            assert letter.source_topic == KERNEL_EVENTS.name and reason in letter.reason
        points = await wait_for(lambda: (lambda p: p if len(p) == 4 else None)(
            kernel_points(stream_env, job)), 60, "the kernel points", stream)
        assert set(points) == {(r, op, d) for r in ("0", "1") for op, d in
                               (("rmsnorm", "forward"), ("swiglu", "backward"))}
        norm = points[("0", "rmsnorm", "forward")]
        assert norm["calls"] == 20 and norm["p50_ms"] == 0.2 and norm["p99_ms"] == 0.4
        assert norm["gbps"] == pytest.approx(5.0)  # 1 MB x 20 calls in 4 ms
        assert "gbps" not in points[("1", "swiglu", "backward")]
        assert stream.poll() is None
    finally:
        await producer.stop()
        await consumer.stop()
        stop(stream)


async def test_training_steps_become_windows_per_job_and_rank(stream_env, unique, tmp_path):
    from mlpe.agent.sources.train_sim import SimulatedTraining

    prefix = f"t{unique}-"
    stream = start_stream(unique, tmp_path / "stream.log")
    try:
        scenario = Scenario(seed=3, nodes=1, gpus_per_node=2, warmup_s=0.0)
        agent = Agent([(SimulatedGpus(scenario, 100, node_prefix=prefix), 100)],
                      Shipper(stream_env.kafka_bootstrap, Spool(tmp_path / "spool")), hz=100,
                      training=SimulatedTraining(scenario, 100, node_prefix=prefix))
        await agent.run(duration_s=6)
        job = f"{prefix}job"

        def steps_per_rank() -> dict[str, float]:
            e = stream_env
            with e.influx() as client:
                tables = client.query_api().query(f'''
                    from(bucket: "{e.bucket_of('1s')}") |> range(start: -1h)
                      |> filter(fn: (r) => r._measurement == "train" and r.job == "{job}"
                                           and r.window == "1s" and r._field == "samples")
                      |> group(columns: ["rank"]) |> sum()''')
            return {t.records[0]["rank"]: t.records[0].get_value() for t in tables}

        # 6 s of 0.5 s steps; the window of each rank's first step may be skipped (a
        # first window that starts mid-way is never written: see windows.py).
        per_rank = agent.stats.train_steps / 2
        found = await wait_for(lambda: (lambda s: s if len(s) == 2 and min(s.values()) >=
                                        per_rank - 2 else None)(steps_per_rank()), 60,
                               "training windows in InfluxDB", stream)
        assert set(found) == {"0", "1"} and found["0"] == found["1"] <= per_rank
    finally:
        stop(stream)


async def test_two_workers_share_the_partitions(stream_env, unique, tmp_path):
    """Two workers of one app: both process batches and no window is missing."""
    prefix = f"w{unique}-"
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    env = mlpe_env(MLPE_STREAM_APP_ID=f"test-stream-{unique}", MLPE_STREAM_START="latest",
                   MLPE_LOG_LEVEL="info", MLPE_INFLUX_TOKEN=os.environ["MLPE_TEST_INFLUX_TOKEN"])
    workers = [start_mlpe("stream", env={**env, "MLPE_STATE_DIR": str(tmp_path / f"state{i}")},
                          log=log) for i, log in enumerate(logs)]
    try:
        wait_stream_ready(stream_env.kafka_bootstrap, env["MLPE_STREAM_APP_ID"], 2, workers)
        # 16 nodes over 8 partitions: each worker's half is all but sure to hold some.
        sim = SimulatedGpus(Scenario(seed=4, nodes=16, gpus_per_node=1), 100, node_prefix=prefix)
        await Agent([(sim, 100)], Shipper(stream_env.kafka_bootstrap,
                                          Spool(tmp_path / "spool")), hz=100,
                    job_id=f"{prefix}job").run(duration_s=12)
        found = await wait_for(lambda: len(windows(stream_env, prefix)) >= 16 * 10 and
                               windows(stream_env, prefix), 60, "1 s windows of 16 nodes")
        devices, problems = complete_interior(found, prefix)
        assert devices == 16 and problems == []

        def batches_seen(log) -> int:
            counts = re.findall(r"stream stats: \{'batches': (\d+)", log.read_text())
            return int(counts[-1]) if counts else 0

        await wait_for(lambda: all(batches_seen(log) > 0 for log in logs), 30,
                       "a stats line with batches from each worker")
    finally:
        for w in workers:
            stop(w)


async def test_a_node_whose_clock_jumped_ahead_costs_no_other_node_its_data(stream_env,
                                                                           unique, tmp_path):
    """The issue's scenario: a few batches stamped 1,000 s ahead on a partition used to
    move its event time, and a new node's 15 s of valid data then left zero points."""
    prefix = f"c{unique}-"
    fine = f"{prefix}00"
    ahead = next(f"{prefix}ahead{i}" for i in range(1000)
                 if partitions_of([f"{prefix}ahead{i}"]) == partitions_of([fine]))
    stream = start_stream(unique, tmp_path / "stream.log")
    letters = await tail(stream_env.kafka_bootstrap, DEAD_LETTER)
    alerts = await tail(stream_env.kafka_bootstrap, ALERTS)
    producer = AIOKafkaProducer(bootstrap_servers=stream_env.kafka_bootstrap)
    await producer.start()
    try:
        await reading(stream_env, producer, f"w{unique}-", fine)
        for seq in range(5):
            times = time.time_ns() + 1000 * 10**9 + np.arange(10, dtype=np.int64) * 10**7
            raw = batches.encode(batches.Batch(ahead, pb.DEVICE_KIND_GPU, 0, "", 1, seq,
                                               seq * 10, times, {pb.GPU_UTIL: np.ones(10)}))
            await producer.send_and_wait(GPU_METRICS.name, raw, key=ahead.encode())
        sim = SimulatedGpus(Scenario(seed=5, nodes=1, gpus_per_node=2), 100, node_prefix=prefix)
        await Agent([(sim, 100)], Shipper(stream_env.kafka_bootstrap,
                                          Spool(tmp_path / "spool")), hz=100,
                    job_id=f"{prefix}job").run(duration_s=15)
        found = await wait_for(lambda: (lambda w: w if len(w) >= 2 * 13 else None)(
            windows(stream_env, prefix)), 60, "the valid node's 1 s windows", stream)
        devices, problems = complete_interior(found, prefix)
        assert devices == 2 and problems == [] and {n for n, _, _ in found} == {fine}
        letter = await next_dead_letter(letters, lambda d: d.key == ahead.encode())
        assert f"node {ahead}'s samples are" in letter.reason and "clock is off" in letter.reason
        async with asyncio.timeout(30):
            named = []
            while not named:
                for records in (await alerts.getmany(timeout_ms=1000)).values():
                    named += [a for a in parsed(Alert, records)
                              if a.rule == "node_clock_ahead" and a.labels["node"] == ahead]
        assert named[0].state == ALERT_FIRING and "ahead" in named[0].summary
    finally:
        await producer.stop()
        for consumer in (letters, alerts):
            await consumer.stop()
        stop(stream)


async def test_a_minute_of_data_becomes_exact_1_min_windows(stream_env, unique, tmp_path):
    """Seventy seconds of two GPUs, stamped from a whole minute a few minutes ago, sent
    as fast as Kafka takes them: the 1 min bucket gets that minute with its samples'
    min, mean, max and last (p95: the largest 10 s p95, a bound from above)."""
    node = f"m{unique}-00"
    minute_ns = (time.time_ns() // 60_000_000_000 - 3) * 60_000_000_000
    rng = np.random.default_rng(7)
    # (samples at 100 Hz, GPUs): power, as float32 (what a MetricBatch carries)
    values = rng.normal(250, 30, size=(70 * 100, 2)).astype(np.float32).astype(np.float64)
    stream = start_stream(unique, tmp_path / "stream.log")
    producer = AIOKafkaProducer(bootstrap_servers=stream_env.kafka_bootstrap)
    await producer.start()
    try:
        for seq, first in enumerate(range(0, len(values), 10)):
            times = minute_ns + (first + np.arange(10, dtype=np.int64)) * 10**7
            raw = batches.encode(batches.join([
                batches.Batch(node, pb.DEVICE_KIND_GPU, gpu, "", 1, seq, first, times,
                              {pb.GPU_POWER: values[first:first + 10, gpu]})
                for gpu in range(2)]))
            await producer.send(GPU_METRICS.name, raw, key=node.encode())
        await producer.flush()

        def one_minute() -> dict | None:
            with stream_env.influx() as client:
                tables = client.query_api().query(f'''
                    from(bucket: "{stream_env.bucket_of('1m')}") |> range(start: -1h)
                      |> filter(fn: (r) => r._measurement == "gpu" and r.node == "{node}")''')
            got = {(r["gpu"], r.get_field()): r.get_value()
                   for t in tables for r in t.records
                   if r["window"] == "1m" and r.get_time().timestamp() * 1e9 == minute_ns}
            return got if len(got) == 2 * 6 else None

        got = await wait_for(one_minute, 60, "the 1 min windows", stream)
        for gpu in range(2):
            x = values[:60 * 100, gpu]
            assert (got[(str(gpu), "power_min")], got[(str(gpu), "power_max")],
                    got[(str(gpu), "power_last")], got[(str(gpu), "samples")]) == \
                (x.min(), x.max(), x[-1], 6000)
            assert got[(str(gpu), "power_mean")] == pytest.approx(x.mean(), rel=1e-12)
            assert np.percentile(x, 95) <= got[(str(gpu), "power_p95")] <= x.max()
    finally:
        await producer.stop()
        stop(stream)


async def test_latest_means_the_ends_when_the_worker_started(stream_env, unique, tmp_path):
    """With MLPE_STREAM_START=latest a new app reads what is sent once its worker has
    pinned its start, even before its groups form and Faust recovers its tables: left to
    the consumers' first fetch, "latest" skipped those seconds."""
    from mlpe.agent.sources.train_sim import SimulatedTraining

    prefix, log = f"p{unique}-", tmp_path / "stream.log"
    env = mlpe_env(MLPE_STREAM_APP_ID=f"test-stream-{unique}", MLPE_STREAM_START="latest",
                   MLPE_STATE_DIR=str(tmp_path / "state"), MLPE_LOG_LEVEL="info",
                   MLPE_INFLUX_TOKEN=os.environ["MLPE_TEST_INFLUX_TOKEN"])
    stream = start_mlpe("stream", env=env, log=log)
    try:
        await wait_for(lambda: "starts at the ends" in log.read_text(), 60,
                       "the worker to pin its start", stream)
        scenario = Scenario(seed=3, nodes=1, gpus_per_node=2, warmup_s=0.0)
        agent = Agent([(SimulatedGpus(scenario, 100, node_prefix=prefix), 100)],
                      Shipper(stream_env.kafka_bootstrap, Spool(tmp_path / "spool")), hz=100,
                      training=SimulatedTraining(scenario, 100, node_prefix=prefix))
        started = time.time()
        await agent.run(duration_s=4)
        job, e = f"{prefix}job", stream_env

        def first_window() -> tuple | None:
            """The earliest 1 s GPU and training windows of the test's node and job."""
            with e.influx() as client:
                tables = client.query_api().query(f'''
                    from(bucket: "{e.bucket_of('1s')}") |> range(start: -1h)
                      |> filter(fn: (r) => r.window == "1s" and r._field == "samples" and
                                ((r._measurement == "gpu" and r.node == "{prefix}00") or
                                 (r._measurement == "train" and r.job == "{job}")))
                      |> group(columns: ["_measurement"]) |> first()''')
            found = {t.records[0]["_measurement"]: t.records[0].get_time() for t in tables}
            return (found["gpu"], found["train"]) if len(found) == 2 else None

        gpu, train = await wait_for(first_window, 90, "the first windows", stream)
        # The agent's first second (a window that starts mid-way is not written) and
        # its first steps (0.5 s each) were read, though sent while the worker joined.
        assert gpu.timestamp() - started <= 2.0, (gpu, started)
        assert train.timestamp() - started <= 2.5, (train, started)
    finally:
        stop(stream)
