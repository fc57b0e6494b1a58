"""Kafka administration every part of mlpe needs: is a broker there, create the topics,
wait until a consumer group has settled."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic

from mlpe.common.topics import ALL_TOPICS

log = logging.getLogger(__name__)


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


# Every Faust app creates this topic of its own; its name gives the app id away.
FAUST_LEADER_SUFFIX = "-__assignor-__leader"
SHORT_LIVED_APPS = ("test-", "bench-", "run-")  # app ids of tests, benchmarks, `mlpe run`


async def delete_topics(bootstrap: str, wanted) -> list[str]:
    """Delete every topic whose name `wanted(name)` accepts; returns the names deleted."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        doomed = sorted(t for t in await admin.list_topics() if wanted(t))
        for start in range(0, len(doomed), 500):  # a bounded request, however many
            await admin.delete_topics(doomed[start:start + 500])
        return doomed
    finally:
        await admin.close()


async def delete_app_topics(bootstrap: str, app_id: str) -> list[str]:
    """Delete the internal topics (changelogs, repartition, leader) of Faust app `app_id`,
    once it has stopped for good."""
    return await delete_topics(bootstrap, lambda name: name.startswith(f"{app_id}-"))


def forget_app(bootstrap: str, app_id: str) -> None:
    """`delete_app_topics` for the end of a benchmark or `mlpe run` (callable inside an
    event loop too); a failure only warns: `mlpe stack prune` sweeps up later."""
    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, delete_app_topics(bootstrap, app_id)).result()
    except Exception as err:  # noqa: BLE001 - cleanup must not fail the run it ends
        log.warning("could not delete the topics of %s: %r", app_id, err)


async def finished_apps(bootstrap: str, prefixes=SHORT_LIVED_APPS) -> list[str]:
    """The Faust apps whose ids start with one of `prefixes` and whose consumer group has
    no member left: their internal topics only cost the broker time at every start."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        apps = sorted(t[: -len(FAUST_LEADER_SUFFIX)] for t in await admin.list_topics()
                      if t.endswith(FAUST_LEADER_SUFFIX) and t.startswith(tuple(prefixes)))
        finished = []
        for app in apps:
            # One group a request: aiokafka 0.14 misreads a response describing several.
            (described,) = await admin.describe_consumer_groups([app])
            _, group, state, *_ = described.groups[0]
            if state in ("Empty", "Dead"):
                finished.append(group)
        return finished
    finally:
        await admin.close()


async def prune_finished_apps(bootstrap: str, prefixes=SHORT_LIVED_APPS) -> dict[str, int]:
    """Delete the internal topics of `finished_apps`; returns {app id: topics deleted}."""
    apps = set(await finished_apps(bootstrap, prefixes))

    def app_of(name: str) -> str | None:  # the app whose id is a dash-ended head of `name`
        heads = (name[:i] for i, ch in enumerate(name) if ch == "-")
        return next((head for head in heads if head in apps), None)

    counts = dict.fromkeys(sorted(apps), 0)
    for name in await delete_topics(bootstrap, lambda name: app_of(name) is not None):
        counts[app_of(name)] += 1
    return counts


async def pin_start(bootstrap: str, group: str, topics: list[str]) -> int:
    """Commit, for `group`, each partition of these topics that has no committed offset
    yet at its end offset now; returns how many were pinned.

    What "latest" means to a new group, decided now rather than at its members' first
    fetch — which comes after the group has formed and, for Faust, after table recovery:
    whatever was sent between the worker's start and that fetch was skipped. A group
    that already has members refuses the commit; they have their positions, so nothing
    is lost."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        present = set(await admin.list_topics()) & set(topics)
        described = await admin.describe_topics(sorted(present)) if present else []
    finally:
        await admin.close()
    parts = [TopicPartition(d["topic"], p["partition"]) for d in described
             for p in d["partitions"]]  # as they are, whatever the settings say
    if not parts:
        return 0
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        fresh = {tp: ends[tp] for tp in parts if await consumer.committed(tp) is None}
        if fresh:
            try:
                await consumer.commit(fresh)
            except KafkaError as err:  # members already: their positions stand
                log.info("%s: start not pinned (%s); the group runs already", group, err)
                return 0
        return len(fresh)
    finally:
        await consumer.stop()
