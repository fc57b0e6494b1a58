"""Hostile input on the real topics while valid data flows: thousands of generated and
mutated messages (random bytes, truncations, bit flips, fields at their edges, hostile
strings) to the metric, training, kernel, cost, inventory and GPU-seconds topics of
`mlpe stream` and to the alerts `mlpe notify` reads. Afterwards every service still runs
and still processes, every message that cannot be valid is in mlpe.deadletter with a
reason, the valid fleet's windows are all in InfluxDB, and InfluxDB holds no measurement,
tag or field that valid data would not make."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from google.protobuf.message import DecodeError

from mlpe.agent.agent import Agent
from mlpe.agent.scenario import Scenario
from mlpe.agent.shipper import Shipper
from mlpe.agent.sources.sim import SimulatedGpus
from mlpe.agent.spool import Spool
from mlpe.common import batches
from mlpe.common.topics import (
    ALERTS,
    COST_EVENTS,
    DEAD_LETTER,
    GPU_METRICS,
    GPU_SECONDS,
    INVENTORY,
    KERNEL_EVENTS,
    TRAIN_EVENTS,
    of_app,
)
from mlpe.stream.decoding import IDENTIFIER
from mlpe.v1 import alerts_pb2, deadletter_pb2
from mlpe.v1 import metrics_pb2 as pb
from mlpe.v1.control_pb2 import JobCost
from mlpe.v1.training_pb2 import KernelSummary, KernelTiming, TrainStep

from .test_alert_path import notify_to_sink
from .test_stream import (  # noqa: F401 - stream_env is a fixture
    complete_interior,
    start_stream,
    stop,
    stream_env,
    wait_for,
    windows,
)

pytestmark = pytest.mark.xdist_group("stream-a")

HOSTILE = ["", "\n", "a\nb", "x,y=1 z=2", "<!channel>", "<http://evil.example|click>",
           "&lt;", "\\", '"', "\x00", "é" * 300, "n" * 129, "node one", "-lead", "a=b"]
EDGE_INTS = [0, -1, 1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]
EDGE_FLOATS = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324]


class Fuzz:
    """The messages sent, by key, and whether each one can possibly be valid."""

    def __init__(self, prefix: str, seed: int = 17):
        self.rng = np.random.default_rng(seed)
        self.prefix = prefix
        self.sent: list[tuple[str, bytes, bytes, bool]] = []  # (topic, key, value, must_refuse)

    def add(self, topic: str, value: bytes, must_refuse: bool) -> None:
        key = f"{self.prefix}{len(self.sent)}".encode()
        self.sent.append((topic, key, value, must_refuse))

    def random_bytes(self) -> bytes:
        return self.rng.bytes(int(self.rng.integers(0, 3000)))

    def truncated(self, raw: bytes) -> bytes:
        return raw[:int(self.rng.integers(0, len(raw)))]

    def flipped(self, raw: bytes) -> bytes:
        out = bytearray(raw)
        for _ in range(int(self.rng.integers(1, 8))):
            i = int(self.rng.integers(0, len(out)))
            out[i] ^= 1 << int(self.rng.integers(0, 8))
        return bytes(out)


def parses(message_type, raw: bytes) -> bool:
    try:
        message_type.FromString(raw)
        return True
    except (DecodeError, RuntimeError):
        return False


def valid_node_batch(node: str, now_ns: int) -> bytes:
    times = now_ns + np.arange(10, dtype=np.int64) * 10_000_000
    return batches.encode(batches.join([
        batches.Batch(node, pb.DEVICE_KIND_GPU, g, f"GPU-{g}", 1, 0, 0, times,
                      {pb.GPU_UTIL: np.full(10, 50.0), pb.GPU_POWER: np.full(10, 300.0)})
        for g in range(2)]))


def hostile_batches(now_ns: int) -> list[bytes]:
    """Node batches that parse but must be refused: every identifier and size at its
    edge or hostile, every timestamp implausible."""
    out = []
    good = pb.MetricBatch.FromString(valid_node_batch("fuzz-node", now_ns))
    for text in HOSTILE:
        for field in ("node_id", "job_id"):
            m = pb.MetricBatch()
            m.CopyFrom(good)
            setattr(m, field, text)
            if field == "job_id" and not text:
                continue  # no job is valid
            out.append(m.SerializeToString())
        m = pb.MetricBatch()
        m.CopyFrom(good)
        m.devices[0].uuid = text + ",x=1"
        out.append(m.SerializeToString())
    for index in (-1, 64, 2**31 - 1, -(2**31)):
        m = pb.MetricBatch()
        m.CopyFrom(good)
        m.devices[0].index = index
        out.append(m.SerializeToString())
    for base in (0, 1, 2**63 - 1, now_ns + 10**12, -(2**63)):
        m = pb.MetricBatch()
        m.CopyFrom(good)
        m.base_time_ns = base
        out.append(m.SerializeToString())
    m = pb.MetricBatch()
    m.CopyFrom(good)
    for g in range(2, 70):  # more devices than MLPE_STREAM_MAX_DEVICES, series too short
        m.devices.add(index=g)
    out.append(m.SerializeToString())
    for kind in (0, 3, -5):
        m = pb.MetricBatch()
        m.CopyFrom(good)
        m.device_kind = kind
        out.append(m.SerializeToString())
    m = pb.MetricBatch()
    m.CopyFrom(good)
    m.series[0].field = 9999
    out.append(m.SerializeToString())
    m = pb.MetricBatch()
    m.CopyFrom(good)
    m.series.add(field=pb.GPU_UTIL, type=pb.VALUE_TYPE_F32, values=b"\x00" * 80)  # twice
    out.append(m.SerializeToString())
    return out


def hostile_steps(now_ns: int) -> list[bytes]:
    out = []
    for text in HOSTILE:
        out.append(TrainStep(job_id=text, rank=0, world_size=1, step=1, time_ns=now_ns,
                             tokens_per_s=1.0, step_time_s=0.1).SerializeToString())
    for rank, world in ((-1, 2), (2, 2), (0, 0), (0, 2**31 - 1), (2**31 - 1, 2)):
        out.append(TrainStep(job_id="fuzz-job", rank=rank, world_size=world, step=1,
                             time_ns=now_ns).SerializeToString())
    for t in (0, 1, 2**63 - 1, now_ns + 10**12, -(2**63)):
        out.append(TrainStep(job_id="fuzz-job", rank=0, world_size=1, step=1,
                             time_ns=t).SerializeToString())
    for value in (math.nan, math.inf, -1.0, -math.inf):
        out.append(TrainStep(job_id="fuzz-job", rank=0, world_size=1, step=1, time_ns=now_ns,
                             tokens_per_s=value, step_time_s=0.1).SerializeToString())
    for step in (0, -1, -(2**63)):
        out.append(TrainStep(job_id="fuzz-job", rank=0, world_size=1, step=step,
                             time_ns=now_ns).SerializeToString())
    out.append(TrainStep(job_id="fuzz-job", rank=0, world_size=1, step=1, time_ns=now_ns,
                         halt="exploded").SerializeToString())
    return out


def hostile_reports(now_ns: int) -> list[bytes]:
    out = [b"", b"{", b"null", b"[]", b'"x"', b"1e999", json.dumps({"node": 5}).encode()]
    for text in HOSTILE:
        out.append(json.dumps({"node": text, "start_ns": now_ns, "gpus": {}}).encode())
        out.append(json.dumps({"node": "n", "job": text or 7, "start_ns": now_ns,
                               "gpus": {}}).encode())
        out.append(json.dumps({"node": "n", "start_ns": now_ns,
                               "gpus": {text or "x": {"util": 1}}}).encode())
    for bad in ("high", True, [1], {"a": 1}):
        out.append(json.dumps({"node": "n", "start_ns": now_ns,
                               "gpus": {"0": {"util": bad}}}).encode())
    return out


def hostile_kernels(now_ns: int) -> list[bytes]:
    def summary(**changes) -> bytes:
        timing = dict(op="rmsnorm", direction="forward", calls=10, total_ms=1.0, p50_ms=0.1,
                      p99_ms=0.2, max_ms=0.3)
        timing.update({k: v for k, v in changes.items() if k in timing})
        top = dict(job_id="fuzz-job", rank=0, first_step=1, last_step=2, time_ns=now_ns,
                   backend="triton")
        top.update({k: v for k, v in changes.items() if k in top})
        return KernelSummary(kernels=[KernelTiming(**timing)], **top).SerializeToString()

    out = [summary(job_id=t) for t in HOSTILE if t] + [summary(op=t) for t in HOSTILE]
    out += [summary(backend=t) for t in HOSTILE if t]
    out += [summary(p50_ms=v) for v in (math.nan, math.inf, -1.0)]
    out += [summary(calls=c) for c in (0, -1)] + [summary(rank=r) for r in (-1, 2**31 - 1)]
    out += [summary(first_step=5, last_step=1), summary(time_ns=0)]
    out.append(KernelSummary(job_id="fuzz-job", time_ns=now_ns).SerializeToString())  # none
    return out


def valid_cost(now_ns: int, **changes) -> bytes:
    fields = dict(job_id="fuzz-job", time_ns=now_ns, gpus=2, gpu_type="h100-sxm",
                  pricing="on_demand", currency="USD", total=1.0, useful=1.0, useful_s=0.25,
                  gpu_hours=0.0001, price_per_gpu_hour=7.2)
    return JobCost(**{**fields, **changes}).SerializeToString()


def hostile_costs(now_ns: int) -> list[bytes]:
    out = [valid_cost(now_ns, job_id=t) for t in HOSTILE]
    out += [valid_cost(now_ns, **{tag: t}) for tag in ("gpu_type", "pricing", "currency")
            for t in HOSTILE if t]
    out += [valid_cost(now_ns, total=v) for v in (math.nan, math.inf, -1.0)]
    out += [valid_cost(now_ns, gpus=-1), valid_cost(now_ns, time_ns=0)]
    return out


def hostile_inventories(fuzz: Fuzz) -> list[bytes]:
    """A few only: the inventory topic is compacted and read whole by every stream worker
    at start (the test deletes them after: tombstones)."""
    out = [fuzz.random_bytes() + b"\xff" for _ in range(3)]
    out += [pb.NodeInventory(node_id=t).SerializeToString() for t in ("", "a b", "x,y=1")]
    out.append(pb.NodeInventory(node_id="fuzz-node", gpus=[
        pb.GpuInfo(index=i, name="NVIDIA H100 80GB HBM3") for i in range(65)]).SerializeToString())
    return out  # random bytes that happen to parse have no valid node_id: refused too


def generate(fuzz: Fuzz, app_id: str, count: int) -> None:
    now_ns = time.time_ns()
    seconds_topic = of_app(GPU_SECONDS, app_id).name
    valid_batch = valid_node_batch("fuzz-node", now_ns)
    valid_step = TrainStep(job_id="fuzz-job", rank=0, world_size=1, step=1, time_ns=now_ns,
                           tokens_per_s=1.0, step_time_s=0.1).SerializeToString()
    valid_alert = alerts_pb2.Alert(
        fingerprint="fz", rule="gpu_hot", state=alerts_pb2.ALERT_FIRING,
        severity=alerts_pb2.SEVERITY_WARNING, labels={"node": "fuzz-node", "gpu": "0"},
        summary="hot", starts_at_ns=now_ns, detected_at_ns=now_ns).SerializeToString()
    for raw in hostile_batches(now_ns):
        fuzz.add(GPU_METRICS.name, raw, True)
    for raw in hostile_steps(now_ns):
        fuzz.add(TRAIN_EVENTS.name, raw, True)
    for raw in hostile_reports(now_ns):
        fuzz.add(seconds_topic, raw, True)
    for raw in hostile_kernels(now_ns):
        fuzz.add(KERNEL_EVENTS.name, raw, True)
    for raw in hostile_costs(now_ns):
        fuzz.add(COST_EVENTS.name, raw, True)
    for raw in hostile_inventories(fuzz):
        fuzz.add(INVENTORY.name, raw, True)
    for text in HOSTILE:  # alerts that parse: delivered escaped, or refused, never a crash
        fuzz.add(ALERTS.name, alerts_pb2.Alert(
            fingerprint=f"fz-{text[:20]}", rule=text, summary=text * 50, explanation=text,
            labels={"node": text, text or "k": text}, state=alerts_pb2.ALERT_FIRING,
            starts_at_ns=now_ns, detected_at_ns=now_ns).SerializeToString(), False)
    mutate = [fuzz.random_bytes, lambda: fuzz.truncated(valid_batch),
              lambda: fuzz.flipped(valid_batch)]
    valid_kernels = KernelSummary(job_id="fuzz-job", rank=0, first_step=1, last_step=2,
                                  time_ns=now_ns, backend="triton", kernels=[KernelTiming(
                                      op="rmsnorm", direction="forward", calls=3,
                                      total_ms=1.0, p50_ms=0.3, p99_ms=0.4, max_ms=0.4)]
                                  ).SerializeToString()
    topics = [(GPU_METRICS.name, valid_batch, pb.MetricBatch),
              (KERNEL_EVENTS.name, valid_kernels, KernelSummary),
              (COST_EVENTS.name, valid_cost(now_ns), JobCost),
              (TRAIN_EVENTS.name, valid_step, TrainStep),
              (ALERTS.name, valid_alert, alerts_pb2.Alert)]
    while len(fuzz.sent) < count:
        topic, valid, message_type = topics[int(fuzz.rng.integers(0, len(topics)))]
        how = int(fuzz.rng.integers(0, 3))
        raw = mutate[how]() if how == 0 else (fuzz.truncated(valid) if how == 1
                                              else fuzz.flipped(valid))
        # Bytes that do not even parse can never be valid; the rest may be.
        fuzz.add(topic, raw, not parses(message_type, raw))


async def dead_letters(bootstrap: str, group: str, prefix: bytes, wanted: set[bytes],
                       timeout: float) -> dict[bytes, deadletter_pb2.DeadLetter]:
    """The dead letters of keys `prefix…`, read until every one of `wanted` is there."""
    # Nothing committed: a commit on stop to a coordinator lost under load can hang.
    consumer = AIOKafkaConsumer(DEAD_LETTER.name, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: dict[bytes, deadletter_pb2.DeadLetter] = {}
    deadline = time.monotonic() + timeout
    try:
        while not wanted <= found.keys() and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for r in records:
                    letter = deadletter_pb2.DeadLetter.FromString(r.value)
                    if letter.key.startswith(prefix):
                        found[letter.key] = letter
    finally:
        await consumer.stop()
    return found


# Fields valid data makes: window stats and samples, alerts', kernel timings', job costs'.
FIELD = re.compile(r"[a-z0-9_]+_(min|mean|max|p95|last)|samples|state|summary|explanation|"
                   r"fingerprint|value|threshold|calls|(total|p50|p99|max)_ms|gbps|"
                   r"(first|last)_step|v|"
                   r"gpus|gpu_hours|total|useful|failure|paused|(useful|failure|paused)_s|"
                   r"price_per_gpu_hour|budget|seconds|idle_seconds|cost|idle_cost")
# Tags valid data makes: windows', alerts' (their labels: node, gpu, job, field),
# stream_dropped's, kernel timings' and job costs'.
TAGS = {"node", "gpu", "job", "window", "rank", "rule", "severity", "field", "reason", "op",
        "direction", "backend", "run", "gpu_type", "pricing", "currency", "_start", "_stop",
        "_field", "_measurement", "_value", "_time"}
# What mlpe writes, and "probe": tests/integration/test_influxdb.py writes that one
# straight to the bucket, maybe at the same time (pytest workers side by side).
MEASUREMENTS = {"gpu", "host", "train", "alert", "stream_dropped", "kernel", "cost",
                "gpu_cost", "probe"}


def influx_schema(e) -> tuple[set[str], set[str], set[str], set[str]]:
    """(measurements, tag keys, field keys, node tag values) of the last 10 minutes, in
    every bucket mlpe writes."""
    with e.influx() as client:
        query = client.query_api()

        def column(flux: str) -> set[str]:
            return {str(r.get_value()) for t in query.query(
                'import "influxdata/influxdb/schema"\n' + flux) for r in t.records}

        found: tuple[set[str], ...] = (set(), set(), set(), set())
        for bucket in (e.influx_bucket, *(e.bucket_of(w) for w in ("1s", "10s", "1m"))):
            for into, flux in zip(found, (
                    f'schema.measurements(bucket: "{bucket}", start: -10m)',
                    f'schema.tagKeys(bucket: "{bucket}", start: -10m)',
                    f'schema.fieldKeys(bucket: "{bucket}", start: -10m)',
                    f'schema.tagValues(bucket: "{bucket}", tag: "node", start: -10m)'),
                    strict=True):
                into |= column(flux)
        return found


async def test_hostile_messages_cost_no_service_and_no_valid_data(stream_env, unique,  # noqa: F811
                                                                  tmp_path):
    app_id = f"test-stream-{unique}"
    fuzz = Fuzz(f"fuzz{unique}-")
    generate(fuzz, app_id, 3000)
    prefix = f"z{unique}-"
    async with notify_to_sink(stream_env, unique, tmp_path) as (notify, _):
        stream = start_stream(unique, tmp_path / "stream.log")
        producer = AIOKafkaProducer(bootstrap_servers=stream_env.kafka_bootstrap,
                                    max_request_size=4 * 2**20)
        await producer.start()
        try:
            sim = SimulatedGpus(Scenario(seed=8, nodes=2, gpus_per_node=2), 100,
                                node_prefix=prefix)
            agent = asyncio.create_task(Agent(
                [(sim, 100)], Shipper(stream_env.kafka_bootstrap, Spool(tmp_path / "spool")),
                hz=100, job_id=f"{prefix}job").run(duration_s=20))
            await asyncio.sleep(3)  # valid data flows first, then the flood amid it
            for i, (topic, key, value, _) in enumerate(fuzz.sent):
                await producer.send(topic, value, key=key)
                if i % 200 == 0:
                    await asyncio.sleep(0.2)
            await producer.flush()
            await agent
            must = {key for _, key, _, refuse in fuzz.sent if refuse}
            letters = await dead_letters(stream_env.kafka_bootstrap, f"t-{unique}",
                                         fuzz.prefix.encode(), must, 120)
            assert stream.poll() is None and notify.poll() is None  # both still running
            missing = [(t, k, v[:60]) for t, k, v, refuse in fuzz.sent
                       if refuse and k not in letters]
            assert missing == []
            assert all(letter.reason and letter.refused_by in ("stream", "notify")
                       for letter in letters.values())
            found = await wait_for(lambda: (lambda w: w if len(w) >= 4 * 17 else None)(
                windows(stream_env, prefix)), 60, "the valid fleet's windows", stream)
            devices, problems = complete_interior(found, prefix)
            assert devices == 4 and problems == []
        finally:
            for topic, key, _, _ in fuzz.sent:  # compacted away: no later start reads them
                if topic == INVENTORY.name:
                    await producer.send(topic, None, key=key)
            await producer.stop()
            stop(stream)
    measurements, tags, fields, nodes = influx_schema(stream_env)
    assert measurements <= MEASUREMENTS, measurements - MEASUREMENTS
    assert tags <= TAGS, tags - TAGS
    assert [f for f in fields if not FIELD.fullmatch(f)] == []
    assert [n for n in nodes if not IDENTIFIER.fullmatch(n)] == []
