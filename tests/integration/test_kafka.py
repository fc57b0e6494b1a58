"""Kafka is real: mlpe's topics exist, and bytes go through a broker."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from mlpe.common.topics import ALL_TOPICS
from tests.helpers import mlpe, mlpe_env


async def test_design_topics_exist_with_declared_partitions(stack_endpoints):
    admin = AIOKafkaAdminClient(bootstrap_servers=stack_endpoints.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([t.name for t in ALL_TOPICS])
    finally:
        await admin.close()
    partitions = {d["topic"]: len(d["partitions"]) for d in described if d["error_code"] == 0}
    assert partitions == {t.name: t.partitions for t in ALL_TOPICS}


async def test_produce_then_consume_round_trip(stack_endpoints, unique):
    topic = f"test.roundtrip.{unique}"
    sent = [(f"node-{i % 3}".encode(), f"value-{i}".encode()) for i in range(50)]
    producer = AIOKafkaProducer(
        bootstrap_servers=stack_endpoints.kafka_bootstrap,
        enable_idempotence=True, acks="all", compression_type="gzip",
    )
    await producer.start()
    try:
        for key, value in sent:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=stack_endpoints.kafka_bootstrap,
        auto_offset_reset="earliest", group_id=f"test-{unique}",
    )
    await consumer.start()
    received = []
    try:
        async with asyncio.timeout(60):
            while len(received) < len(sent):
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    received += [(r.key, r.value) for r in records]
    finally:
        await consumer.stop()
    # One partition (auto-created): order is preserved end to end.
    assert received == sent


async def test_create_topics_grows_a_topic_with_fewer_partitions(stack_endpoints, unique):
    """A stack made before a partition count was raised gets the rest at `stack up`."""
    import dataclasses

    from mlpe.common.kafka import create_topics
    from mlpe.common.topics import GPU_METRICS

    topic = dataclasses.replace(GPU_METRICS, name=f"test.grow.{unique}", partitions=2)
    assert await create_topics(stack_endpoints.kafka_bootstrap, [topic]) == [topic.name]
    more = dataclasses.replace(topic, partitions=6)
    assert await create_topics(stack_endpoints.kafka_bootstrap, [more]) == [topic.name]
    assert await create_topics(stack_endpoints.kafka_bootstrap, [topic]) == []  # never fewer
    admin = AIOKafkaAdminClient(bootstrap_servers=stack_endpoints.kafka_bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic.name])
        assert len(described["partitions"]) == 6
        await admin.delete_topics([topic.name])
    finally:
        await admin.close()


async def test_prune_deletes_the_topics_of_finished_apps_only(stack_endpoints, unique):
    """Internal topics of a stream app whose group has no member go; a running app's and
    another name's stay. (Prefixes of this test's own: the suite's apps run meanwhile.)"""
    from mlpe.common.kafka import FAUST_LEADER_SUFFIX, create_topics, prune_finished_apps
    from mlpe.common.topics import Topic

    bootstrap = stack_endpoints.kafka_bootstrap
    done, running, other = (f"test-prune-{unique}-{n}" for n in ("done", "running", "other"))
    names = [f"{app}{suffix}" for app in (done, running, other)
             for suffix in (FAUST_LEADER_SUFFIX, "-gpu-series-changelog")]
    await create_topics(bootstrap, [Topic(name, 2, 3_600_000, "none", "bytes") for name in names])
    member = AIOKafkaConsumer(f"{running}{FAUST_LEADER_SUFFIX}", bootstrap_servers=bootstrap,
                              group_id=running)
    await member.start()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        async with asyncio.timeout(60):
            while not member.assignment():  # joined: the group is not empty
                await member.getmany(timeout_ms=200)
        pruned = await prune_finished_apps(bootstrap, prefixes=(f"test-prune-{unique}-d",
                                                                 f"test-prune-{unique}-r"))
        assert pruned == {done: 2}
        async with asyncio.timeout(60):  # deletion is asynchronous in the broker
            while any(name.startswith(done) for name in await admin.list_topics()):
                await asyncio.sleep(0.2)
        left = {t for t in await admin.list_topics() if unique in t}
        assert left == {n for n in names if not n.startswith(done)}
        await member.stop()  # now it is finished too: `mlpe stack prune` takes it
        cli = mlpe("stack", "prune", "--prefix", f"test-prune-{unique}-r", check=True,
                    env=mlpe_env(MLPE_KAFKA_BOOTSTRAP=bootstrap))
        assert cli.stdout.strip() == \
            f"kafka: deleted 2 topics of 1 finished apps named test-prune-{unique}-r*"
    finally:
        await member.stop()
        await admin.close()


async def test_pin_start_commits_the_ends_of_a_new_group_only(stack_endpoints, unique):
    from aiokafka import TopicPartition

    from mlpe.common.kafka import create_topics, pin_start
    from mlpe.common.topics import Topic

    bootstrap, topic = stack_endpoints.kafka_bootstrap, f"test.pin.{unique}"
    await create_topics(bootstrap, [Topic(topic, 2, 3_600_000, "none", "bytes")])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, b"before", partition=i % 2)
        group = f"test-pin-{unique}"
        assert await pin_start(bootstrap, group, [topic, f"test.absent.{unique}"]) == 2
        await producer.send_and_wait(topic, b"after", partition=0)
        assert await pin_start(bootstrap, group, [topic]) == 0  # committed already
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        assert await consumer.committed(TopicPartition(topic, 0)) == 3
        assert await consumer.committed(TopicPartition(topic, 1)) == 2
        async with asyncio.timeout(60):
            got = []
            while not got:
                got = [r.value for rs in (await consumer.getmany(timeout_ms=500)).values()
                       for r in rs]
        assert got == [b"after"]  # from the pinned ends: nothing before them
    finally:
        await consumer.stop()
