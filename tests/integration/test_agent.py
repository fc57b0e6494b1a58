"""The agent against a real Kafka: every sample arrives once and in order per device,
including across a 60 s Kafka outage."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from mlpe.agent.agent import Agent
from mlpe.agent.scenario import Scenario
from mlpe.agent.shipper import Shipper
from mlpe.agent.sources.sim import SimulatedGpus
from mlpe.agent.spool import Spool
from mlpe.common import batches
from mlpe.common.topics import GPU_METRICS, Topic
from tests.helpers import isolated_stack_env, mlpe


async def end_offsets(bootstrap: str, topic: Topic) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        return await consumer.end_offsets(parts)
    finally:
        await consumer.stop()


async def collect(bootstrap: str, start: dict[TopicPartition, int], prefix: str,
                  expected_batches: int, timeout: float = 90) -> list[batches.Batch]:
    """Every batch of nodes named `prefix…` after `start`, in partition order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    got: list[batches.NodeBatch] = []
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        async with asyncio.timeout(timeout):
            while len(got) < expected_batches:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    got += [batches.decode(r.value) for r in records  # keyed by node id
                            if r.key and r.key.startswith(prefix.encode())]
    finally:
        await consumer.stop()
    return got


def check_every_sample_once_in_order(got: list[batches.NodeBatch], agent: Agent) -> None:
    per_device = defaultdict(list)
    for node in got:
        for d in range(node.devices):
            b = node.device(d)
            per_device[(b.node_id, b.device_index)].append(b)
    buf = agent.buffers[0]
    assert len(per_device) == len(buf.source.devices)
    for device, seen in per_device.items():
        seqs = [b.batch_seq for b in seen]
        assert seqs == list(range(len(seqs))), f"{device}: batches out of order or missing"
        firsts = [b.first_sample_seq for b in seen]
        sizes = [b.samples for b in seen]
        assert firsts == [sum(sizes[:i]) for i in range(len(sizes))], f"{device}: sample gap"
        assert sum(sizes) == agent.stats.ticks, f"{device}: {sum(sizes)} of {agent.stats.ticks}"
        times = [t for b in seen for t in b.timestamps_ns]
        assert times == sorted(times)


def make_agent(bootstrap: str, tmp_path, nodes: int, gpus: int, prefix: str) -> Agent:
    sim = SimulatedGpus(Scenario(seed=1, nodes=nodes, gpus_per_node=gpus), 100,
                        node_prefix=prefix)
    return Agent([(sim, 100)], Shipper(bootstrap, Spool(tmp_path / "spool")), hz=100,
                 flush_s=0.1)


async def test_every_sample_arrives_once_in_order(stack_endpoints, unique, tmp_path):
    bootstrap = stack_endpoints.kafka_bootstrap
    start = await end_offsets(bootstrap, GPU_METRICS)
    agent = make_agent(bootstrap, tmp_path, nodes=2, gpus=4, prefix=f"t{unique}-")
    await agent.run(duration_s=3)
    assert agent.shipper.stats.spooled == 0 and len(agent.shipper.spool) == 0
    got = await collect(bootstrap, start, f"t{unique}-", agent.stats.batches)
    assert len(got) == agent.stats.batches == 2 * 30  # one message per node per flush
    assert all(b.devices == 4 for b in got)
    check_every_sample_once_in_order(got, agent)
    assert all(len(b.columns) == len(batches.GPU_FIELDS) for b in got)


@pytest.mark.slow  # a 60 s outage, then the drain
async def test_kafka_outage_of_60s_loses_nothing(stack_endpoints, unique, tmp_path):
    env = isolated_stack_env(tmp_path / "state", "kafka")
    bootstrap = f"127.0.0.1:{env['MLPE_KAFKA_PORT']}"

    async def stack(*args: str) -> None:
        await asyncio.to_thread(mlpe, "stack", *args, "--only", "kafka", "--json", env=env,
                                timeout=180, check=True)

    await stack("up")
    try:
        start = await end_offsets(bootstrap, GPU_METRICS)
        agent = make_agent(bootstrap, tmp_path, nodes=1, gpus=8, prefix=f"o{unique}-")
        # Sampling goes on until 10 s after Kafka is back (however long stopping and
        # starting it take on a loaded machine), then the agent drains and stops.
        run = asyncio.create_task(agent.run(duration_s=None, drain_timeout_s=120))
        async with asyncio.timeout(30):  # shipping normally before the outage
            while agent.shipper.stats.sent < 200:
                await asyncio.sleep(0.2)
        await stack("down")
        down_at = asyncio.get_running_loop().time()
        async with asyncio.timeout(60):
            while agent.shipper.up or not len(agent.shipper.spool):
                await asyncio.sleep(0.5)
        assert agent.shipper.stats.outages >= 1 or not agent.shipper.up
        await asyncio.sleep(max(0.0, 60 - (asyncio.get_running_loop().time() - down_at)))
        spooled_during_outage = len(agent.shipper.spool)
        await stack("up")
        await asyncio.sleep(10)
        agent.stop()
        await run
        assert spooled_during_outage > 10 * 50  # ~60 s of node batches waited on disk
        assert len(agent.shipper.spool) == 0 and agent.shipper.spool.lost == 0
        got = await collect(bootstrap, start, f"o{unique}-", agent.stats.batches, timeout=120)
        assert len(got) == agent.stats.batches
        check_every_sample_once_in_order(got, agent)
        print(json.dumps({"spooled": agent.shipper.stats.spooled, "batches": len(got)}))
    finally:
        await stack("down")
