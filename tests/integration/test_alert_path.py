"""Be told: a simulated Xid travels agent → Kafka → stream → mlpe.alerts → notify → webhook,
once, and its resolution-free alert is not repeated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from mlpe.agent.agent import Agent
from mlpe.agent.scenario import parse
from mlpe.agent.shipper import Shipper
from mlpe.agent.sources.sim import SimulatedGpus
from mlpe.agent.spool import Spool
from mlpe.common.kafka import wait_group_stable
from mlpe.common.topics import ALERTS, GPU_METRICS, metrics_group
from mlpe.notify.slack import parse_message
from mlpe.v1 import alerts_pb2
from tests.helpers import mlpe_env, parsed, start_mlpe, stop_gracefully

from .test_notify import received, start_sink
from .test_stream import (  # noqa: F401 - stream_env is a fixture
    partitions_of,
    start_stream,
    stop,
    stream_env,
)

# Tests that start `mlpe stream` go in two groups, each on one pytest worker: every
# stream worker reads all of mlpe.metrics.*, so many at once would each do the work of
# all (every test's fleet is a job of its own, so none judges another's GPUs).
pytestmark = pytest.mark.xdist_group("stream-a")


@contextlib.asynccontextmanager
async def notify_to_sink(endpoints, unique: str, tmp_path):
    """A webhook sink and `mlpe notify` posting to it, reading mlpe.alerts from its end and
    ready (its group stable) before the test produces anything; yields the sink's URL."""
    runner, base = await start_sink()
    env = mlpe_env(MLPE_SLACK_WEBHOOK_URL=f"{base}/hook",
                   MLPE_NOTIFY_GROUP_ID=f"test-notify-{unique}",
                   MLPE_NOTIFY_REDIS_PREFIX=f"test:{unique}", MLPE_NOTIFY_START="latest")
    notify = start_mlpe("notify", "--group-wait", "0.5", env=env, log=tmp_path / "notify.log")
    try:
        wait_group_stable(endpoints.kafka_bootstrap, f"test-notify-{unique}", 1, [notify])
        yield notify, base
    finally:
        # In a thread: the sink serves on this event loop, and a delivery in flight at
        # SIGTERM must get its answer (a blocking wait here held notify for 30 s).
        await asyncio.to_thread(stop_gracefully, notify, "mlpe notify")
        await runner.cleanup()


async def run_fault_to_webhook(endpoints, unique, tmp_path, fault: str, seconds: float,
                               expect: int = 1):
    """Run one simulated fault through the whole path; return the webhook posts for it
    (waits for `expect` of them, then 2 s more for any extra)."""
    node = f"x{unique}"
    async with notify_to_sink(endpoints, unique, tmp_path) as (notify, base):
        # Both consumers ready before the first sample: the timeline is the scenario's.
        stream = start_stream(unique, tmp_path / "stream.log")
        try:
            scenario = parse(f"nodes: 1\ngpus_per_node: 2\nfaults:\n  - {fault}\n")
            sim = SimulatedGpus(scenario, 100, node_prefix=f"{node}-")
            # A job of its own: its GPUs are never compared with another test's.
            agent = Agent([(sim, 100)], Shipper(endpoints.kafka_bootstrap,
                                                Spool(tmp_path / "spool")), hz=100,
                          job_id=f"{node}-job")
            await agent.run(duration_s=seconds)
            mine = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and len(mine) < expect:
                for proc, name in ((notify, "notify"), (stream, "stream")):
                    assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-2000:]
                mine = [r for r in (await received(base))["received"] if node in r["body"]]
                await asyncio.sleep(0.2)
            await asyncio.sleep(2)  # would a second message for the same fault arrive? no
            bodies = [json.loads(r["body"]) for r in (await received(base))["received"]
                      if node in r["body"]]
            return node, [b["text"] for b in bodies]
        finally:
            stop(stream)


async def test_xid_reaches_the_webhook_once(stream_env, unique, tmp_path):  # noqa: F811
    node, texts = await run_fault_to_webhook(
        stream_env, unique, tmp_path, "{kind: xid, node: 0, gpu: 1, at_s: 2, code: 79}", 6)
    assert texts == [f"[FIRING] Xid 79 on GPU 1 on {node}-00"]
    # ... and it is an annotation for Grafana in InfluxDB.
    e = stream_env
    with e.influx() as client:
        tables = client.query_api().query(f'''
            from(bucket: "{e.influx_bucket}") |> range(start: -1h)
              |> filter(fn: (r) => r._measurement == "alert" and r.node == "{node}-00"
                                   and r._field == "summary")''')
    assert [r.get_value() for t in tables for r in t.records] == [
        f"Xid 79 on GPU 1 on {node}-00"]


async def test_power_cap_rule_fires_and_resolves(stream_env, unique, tmp_path):  # noqa: F811
    # deploy/rules/default.yaml: power limit below 600 W for 2 s -> warning.
    node, texts = await run_fault_to_webhook(
        stream_env, unique, tmp_path,
        "{kind: power_cap, node: 0, gpu: 0, at_s: 1, for_s: 5, magnitude: 0.5}", 9, expect=2)
    assert texts == [f"[FIRING] GPU 0 on {node}-00 power-capped",
                     f"[RESOLVED] GPU 0 on {node}-00 power-capped"]


async def test_kill_9_of_the_stream_sends_no_notification_twice(stream_env, unique, tmp_path):  # noqa: F811
    """The stream worker is killed the moment the Xid alert reaches the webhook (its
    batch is not yet committed, so it is processed again after the restart); every
    alert must still be notified exactly once."""
    node = f"k{unique}"
    log = tmp_path / "stream.log"
    async with notify_to_sink(stream_env, unique, tmp_path) as (_notify, base):
        # The stream's group has commits on the test's partitions before it starts, so the
        # restart resumes from a commit whatever else those partitions carry (another
        # test's source can hold their commits back for a minute: rollup.py).
        await commit_ends(stream_env.kafka_bootstrap, metrics_group(f"test-stream-{unique}"),
                          partitions_of([f"{node}-00", f"{node}-01"]))
        stream = start_stream(unique, log)
        try:
            # The Xid 12 s in, with the agent started 0.5 s into a 10 s window: its sample
            # lies early in a whole 10 s window (a source's first, partial one is skipped),
            # which holds its batch uncommitted for ~7 s after the alert arrives.
            await asyncio.sleep((10.5 - time.time() % 10) % 10)
            started_ms = int(time.time() * 1000)
            scenario = parse("nodes: 2\ngpus_per_node: 2\ntraining: {warmup_s: 0}\nfaults:\n"
                             "  - {kind: xid, node: 0, gpu: 1, at_s: 12, code: 79}\n"
                             "  - {kind: straggler, node: 1, gpu: 0, at_s: 5}\n"
                             "  - {kind: xid, node: 1, gpu: 1, at_s: 16, code: 48}\n")
            sim = SimulatedGpus(scenario, 100, node_prefix=f"{node}-")
            agent = Agent([(sim, 100)], Shipper(stream_env.kafka_bootstrap,
                                                Spool(tmp_path / "spool")), hz=100,
                          job_id=f"{node}-job")
            run = asyncio.create_task(agent.run(duration_s=24))

            async def texts() -> list[str]:
                """Every alert of every message (a message may group several), as its title."""
                return [("[FIRING] " if firing else "[RESOLVED] ") + title
                        for r in (await received(base))["received"] if node in r["body"]
                        for title, _, _, firing in parse_message(r["body"])]

            deadline = time.monotonic() + 60
            while f"[FIRING] Xid 79 on GPU 1 on {node}-00" not in await texts():
                assert time.monotonic() < deadline and stream.poll() is None, \
                    log.read_text()[-2000:]
                await asyncio.sleep(0.05)
            os.kill(stream.pid, signal.SIGKILL)
            stream.wait()
            stream = start_stream(unique, log)
            await run
            want = {f"[FIRING] Xid 79 on GPU 1 on {node}-00",
                    f"[FIRING] Xid 48 on GPU 1 on {node}-01",
                    f"[FIRING] GPU 0 on {node}-01: SM clock 30% below its peers"}
            deadline = time.monotonic() + 60
            while not want <= set(await texts()) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            await asyncio.sleep(3)  # would a second message for any of them arrive? no
            got = await texts()
            assert sorted(t for t in got if t.startswith("[FIRING]")) == sorted(want), got
            # The test is only worth something if the restarted worker did send the Xid
            # alert again (a 10 s window held its batch, so it was not committed).
            xids = [a for a in await alerts_since(stream_env.kafka_bootstrap, started_ms)
                    if a.summary == f"Xid 79 on GPU 1 on {node}-00"]
            assert len(xids) >= 2, "the kill did not make the stream replay the Xid"
        finally:
            stop(stream)


async def commit_ends(bootstrap: str, group: str, partitions: set[int]) -> None:
    """Commit, for `group`, the current end of these partitions of the GPU metrics topic."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(GPU_METRICS.name, p) for p in partitions]
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        await consumer.commit(ends)
    finally:
        await consumer.stop()


async def alerts_since(bootstrap: str, since_ms: int) -> list[alerts_pb2.Alert]:
    """Every alert on mlpe.alerts written since `since_ms` (Unix ms)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(ALERTS.name, p) for p in range(ALERTS.partitions)]
        consumer.assign(parts)
        starts = await consumer.offsets_for_times({tp: since_ms for tp in parts})
        ends = await consumer.end_offsets(parts)
        out = []
        for tp in parts:
            if starts[tp] is None:
                continue
            consumer.seek(tp, starts[tp].offset)
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                out += parsed(alerts_pb2.Alert, batch.get(tp, []))
        return out
    finally:
        await consumer.stop()
