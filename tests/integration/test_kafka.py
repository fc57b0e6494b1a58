"""Kafka is real: mlpe's topics exist, and bytes go through a broker."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from mlpe.common.topics import ALL_TOPICS


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
