"""Kafka administration every part of mlpe needs: is a broker there, create the topics,
wait until a consumer group has settled."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic

from mlpe.common.topics import ALL_TOPICS


def kafka_reachable(bootstrap: str) -> bool:
    """Does a broker at `bootstrap` answer a metadata request?"""
    try:
        return asyncio.run(describe_cluster(bootstrap)) is not None
    except Exception:  # noqa: BLE001 - any failure means "not answering"
        return False


async def describe_cluster(bootstrap: str):
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await asyncio.wait_for(admin.start(), timeout=5)
        return await asyncio.wait_for(admin.describe_cluster(), timeout=5)
    finally:
        await admin.close()


async def create_topics(bootstrap: str, topics=ALL_TOPICS) -> list[str]:
    """Create those of `topics` that do not exist, and give those that exist with fewer
    partitions than declared the rest (Kafka never takes partitions away); return the
    names created or grown."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        if missing:
            await admin.create_topics(
                [NewTopic(t.name, t.partitions, 1, topic_configs=t.config) for t in missing]
            )
        present = [t for t in topics if t.name in existing]
        have = {d["topic"]: len(d["partitions"])
                for d in await admin.describe_topics([t.name for t in present])} \
            if present else {}
        grow = [t for t in present if have.get(t.name, t.partitions) < t.partitions]
        if grow:
            await admin.create_partitions({t.name: NewPartitions(t.partitions) for t in grow})
        return [t.name for t in missing + grow]
    finally:
        await admin.close()


def wait_group_stable(bootstrap: str, group: str, members: int, workers, timeout=90.0):
    """Until the consumer group of `workers` (processes: the stream's workers, notifiers)
    is Stable with `members` in it; fails at once if one of them exits."""

    async def state() -> tuple[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            described = await admin.describe_consumer_groups([group])
            g = described[0].groups[0]
            return g[2], len(g[5])  # (error, group, state, protocol type, protocol, members)
        finally:
            await admin.close()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w.poll() is not None for w in workers):
            raise RuntimeError(f"a member of {group} exited while joining its group")
        try:
            # A thread of its own, so this also works when called inside an event loop.
            with ThreadPoolExecutor(1) as pool:
                group_state, joined = pool.submit(asyncio.run, state()).result()
        except Exception:  # noqa: BLE001 - not there yet
            group_state, joined = "", 0
        if group_state == "Stable" and joined == members:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{group} did not form a stable group in {timeout:.0f} s")


def wait_stream_ready(bootstrap: str, app_id: str, members: int, workers,
                      timeout=90.0) -> None:
    """Until `workers` (mlpe stream processes of app `app_id`) are members of both of
    the app's groups: its Faust agents' and its metrics consumer's."""
    from mlpe.common.topics import metrics_group

    for group in (app_id, metrics_group(app_id)):
        wait_group_stable(bootstrap, group, members, workers, timeout)
