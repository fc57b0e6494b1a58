"""The notifier against real Redis and the real webhook sink (and Kafka end to end)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from mlpe.common.kafka import wait_group_stable
from mlpe.common.topics import DEAD_LETTER
from mlpe.notify.notifier import Notifier, Timing
from mlpe.notify.routes import Route, Routes
from mlpe.notify.sink import make_app
from mlpe.notify.slack import MAX_BLOCKS, MAX_TEXT_OBJECT, parse_message
from mlpe.v1 import alerts_pb2 as pb
from mlpe.v1 import deadletter_pb2
from tests.helpers import free_port, mlpe_env, start_mlpe, stop_gracefully

HOSTILE = "<!channel> <http://evil|click> & "


async def start_sink(fail=(), retry_after=None):
    """The webhook sink on a free port, Slack's limits enforced (it answers 400 as Slack
    does); returns (runner, base URL)."""
    port = free_port()
    runner = web.AppRunner(make_app(None, list(fail), retry_after))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def received(base: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/received") as r:
        return await r.json()


def alert(fp: str, state=pb.ALERT_FIRING, node="n1", rule="gpu_hot") -> bytes:
    return pb.Alert(fingerprint=fp, rule=rule, severity=pb.SEVERITY_WARNING, state=state,
                    labels={"node": node}, summary=f"{rule} on {node}", explanation="why",
                    starts_at_ns=time.time_ns()).SerializeToString()


@pytest.fixture
async def notifier_and_sink(stack_endpoints, unique, monkeypatch):
    runner, base = await start_sink()
    hooks = {f"HOOK_{unique}": f"{base}/hook-secret-{unique}"}
    redis = aioredis.Redis.from_url(stack_endpoints.redis_url)
    routes = Routes((), Route("default", f"HOOK_{unique}"))
    notifier = Notifier(redis, routes, hooks.get,
                        Timing(group_wait_s=0.3, min_post_interval_s=0.05),
                        prefix=f"test:{unique}")
    yield notifier, base
    await redis.aclose()
    await runner.cleanup()


def sent_alerts(posts: list[dict]) -> list[tuple[str, str, dict[str, str], bool]]:
    """Every alert of the posts the sink accepted, as parse_message reads them."""
    return [a for p in posts for a in parse_message(p["body"])]


def assert_within_slack_limits(posts: list[dict]) -> None:
    for p in posts:
        message = json.loads(p["body"])
        assert len(message["blocks"]) <= MAX_BLOCKS
        for block in message["blocks"]:
            for obj in [block["text"]] if "text" in block else block["elements"]:
                assert len(obj["text"]) <= MAX_TEXT_OBJECT


async def test_a_group_of_60_alerts_arrives_entirely(notifier_and_sink):
    """One node-wide event: 60 alerts of one group were 120 blocks, refused by Slack and
    retried for ever; now 3 numbered messages within the limits, every alert in one."""
    notifier, base = notifier_and_sink
    for i in range(60):
        assert await notifier.receive(alert(f"w{i}", rule=f"rule{i}")) == "queued"
    got = await deliver_until(notifier, base, 3)
    assert [a["status"] for a in (await received(base))["attempts"]] == [200] * 3
    assert_within_slack_limits(got)
    assert sorted(t for t, *_ in sent_alerts(got)) == sorted(f"rule{i} on n1" for i in range(60))
    assert [json.loads(p["body"])["text"][-5:] for p in got] == ["(1/3)", "(2/3)", "(3/3)"]


async def test_a_hostile_summary_arrives_escaped_and_bounded(notifier_and_sink):
    notifier, base = notifier_and_sink
    for fp, summary in (("h1", HOSTILE + "<@U0123>"), ("h2", HOSTILE + "x" * 10_000)):
        hostile = pb.Alert(fingerprint=fp, rule="r", state=pb.ALERT_FIRING, summary=summary,
                           explanation=HOSTILE * 500, labels={"node": "<!here>", "job": "j&<"})
        assert await notifier.receive(hostile.SerializeToString()) == "queued"
    [got] = await deliver_until(notifier, base, 1)
    assert_within_slack_limits([got])
    message = json.loads(got["body"])
    for block in message["blocks"]:
        for obj in [block["text"]] if "text" in block else block["elements"]:
            assert "<" not in obj["text"] and ">" not in obj["text"], obj["text"][:200]
    assert "<" not in message["text"] and "&lt;!channel&gt;" in message["text"]
    titles = [t for t, *_ in sent_alerts([got])]
    assert titles[0] == HOSTILE + "<@U0123>"  # shown as text, read back unchanged
    assert titles[1].startswith(HOSTILE + "xxx") and titles[1].endswith("…")
    assert len(titles[1]) < 400


async def test_a_message_refused_for_good_is_dead_lettered_not_retried(stack_endpoints,
                                                                       unique):
    runner, base = await start_sink(fail=[400])
    redis = aioredis.Redis.from_url(stack_endpoints.redis_url)
    letters = []

    async def dead_letter(source, value, reason):
        letters.append((source, value, reason))

    notifier = Notifier(redis, Routes((), Route("default", f"HOOK_{unique}")),
                        {f"HOOK_{unique}": f"{base}/hook"}.get,
                        Timing(group_wait_s=0.0, min_post_interval_s=0.05),
                        prefix=f"test:{unique}", dead_letter=dead_letter)
    try:
        raw = alert("x1")
        await notifier.receive(raw)
        assert await notifier.deliver_due() == 0
        [(source, value, reason)] = letters
        assert value == raw and source.topic == "mlpe.alerts"
        assert "refused the message for good" in reason
        assert notifier.counters["refused_posts"] == 1
        assert await redis.lrange(f"test:{unique}:group:default|node=n1|job=", 0, -1) == []
        assert await redis.zscore(f"test:{unique}:due", "default|node=n1|job=") is None
        await notifier.deliver_due()
        assert len((await received(base))["attempts"]) == 1  # not tried again
    finally:
        await redis.aclose()
        await runner.cleanup()


async def deliver_until(notifier, base, count, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await notifier.deliver_due()
        got = (await received(base))["received"]
        if len(got) >= count:
            return got
        await asyncio.sleep(0.1)
    return (await received(base))["received"]


async def test_group_dedup_and_resolve(notifier_and_sink):
    notifier, base = notifier_and_sink
    assert await notifier.receive(alert("a1")) == "queued"
    assert await notifier.receive(alert("a2")) == "queued"      # same group: one message
    assert await notifier.receive(alert("a1")) == "duplicate"   # already firing
    got = await deliver_until(notifier, base, 1)
    assert len(got) == 1
    text = json.loads(got[0]["body"])["text"]
    assert text == "[FIRING] gpu_hot on n1 (+1 more)"
    assert await notifier.receive(alert("a1")) == "duplicate"   # notified: still deduplicated
    assert await notifier.receive(alert("a1", pb.ALERT_RESOLVED)) == "queued"
    assert await notifier.receive(alert("zz", pb.ALERT_RESOLVED)) == "resolve-of-unknown"
    got = await deliver_until(notifier, base, 2)
    assert len(got) == 2 and json.loads(got[1]["body"])["text"].startswith("[RESOLVED]")
    await asyncio.sleep(0.5)
    await notifier.deliver_due()
    assert len((await received(base))["received"]) == 2  # nothing more


async def test_500_then_200_is_exactly_one_delivery(stack_endpoints, unique, monkeypatch):
    runner, base = await start_sink(fail=[500, 429], retry_after=0.2)
    hooks = {f"HOOK_{unique}": f"{base}/hook"}
    redis = aioredis.Redis.from_url(stack_endpoints.redis_url)
    notifier = Notifier(redis, Routes((), Route("default", f"HOOK_{unique}")), hooks.get,
                        Timing(group_wait_s=0.1, min_post_interval_s=0.05),
                        prefix=f"test:{unique}")
    try:
        await notifier.receive(alert("r1"))
        got = await deliver_until(notifier, base, 1)
        state = await received(base)
        assert len(got) == 1
        assert [a["status"] for a in state["attempts"]] == [500, 429, 200]
        await asyncio.sleep(0.5)
        await notifier.deliver_due()
        assert len((await received(base))["received"]) == 1
    finally:
        await redis.aclose()
        await runner.cleanup()


async def test_unreachable_webhook_keeps_the_alert_and_hides_the_url(stack_endpoints, unique,
                                                                    monkeypatch, caplog):
    secret = f"http://127.0.0.1:{free_port()}/services/T000/B000/secret{unique}"
    redis = aioredis.Redis.from_url(stack_endpoints.redis_url)
    notifier = Notifier(redis, Routes((), Route("default", f"HOOK_{unique}")),
                        {f"HOOK_{unique}": secret}.get, Timing(group_wait_s=0.0),
                        prefix=f"test:{unique}")
    monkeypatch.setattr("mlpe.notify.notifier.post",
                        _fast_post)  # same code path, fewer retries: keeps the test short
    try:
        await notifier.receive(alert("u1"))
        assert await notifier.deliver_due() == 0
        pending = await redis.lrange(f"test:{unique}:group:default|node=n1|job=", 0, -1)
        assert len(pending) == 1  # kept for a later try, not lost
        assert secret not in caplog.text and f"secret{unique}" not in caplog.text
        assert "failed after 2 attempts" in caplog.text
    finally:
        await redis.aclose()


async def _fast_post(url, payload):
    from mlpe.notify import slack

    await slack.post(url, payload, attempts=2, max_delay_s=0.1, timeout_s=2)


def notify_env(base: str, unique: str) -> dict[str, str]:
    return mlpe_env(MLPE_SLACK_WEBHOOK_URL=f"{base}/hook",
                    MLPE_NOTIFY_GROUP_ID=f"test-notify-{unique}",
                    MLPE_NOTIFY_REDIS_PREFIX=f"test:{unique}",
                    # Only what this test sends: earlier alerts on the topic would queue first.
                    MLPE_NOTIFY_START="latest")


async def posts_about(base: str, unique: str, count: int, proc, log) -> list[dict]:
    """The sink's accepted posts mentioning `unique`, once there are `count` (60 s)."""
    deadline = time.monotonic() + 60
    mine = []
    while time.monotonic() < deadline and len(mine) < count:
        assert proc.poll() is None, log.read_text()[-2000:]
        mine = [g for g in (await received(base))["received"] if unique in g["body"]]
        await asyncio.sleep(0.2)
    return mine


async def test_alerts_from_kafka_to_the_sink(stack_endpoints, unique, tmp_path):
    """Garbage, absurd and hostile alerts among valid ones on the real topic: the bad ones
    are dead letters with their reason, every valid one reaches the sink within limits."""
    runner, base = await start_sink()
    log = tmp_path / "notify.log"
    proc = start_mlpe("notify", "--group-wait", "0.2", env=notify_env(base, unique), log=log)
    producer = AIOKafkaProducer(bootstrap_servers=stack_endpoints.kafka_bootstrap)
    letters = AIOKafkaConsumer(bootstrap_servers=stack_endpoints.kafka_bootstrap)
    await producer.start()
    await letters.start()
    try:
        # At the end of the dead letters before sending (a group's "latest" would be
        # resolved only once assigned: possibly after the letters this test expects).
        await letters.topics()  # metadata, for the partitions
        ends = [TopicPartition(DEAD_LETTER.name, p)
                for p in letters.partitions_for_topic(DEAD_LETTER.name) or {0}]
        letters.assign(ends)
        await letters.seek_to_end(*ends)
        for tp in ends:
            await letters.position(tp)
        wait_group_stable(stack_endpoints.kafka_bootstrap, f"test-notify-{unique}", 1, [proc])
        await producer.send_and_wait("mlpe.alerts", alert(f"k{unique}", node=f"node-{unique}"),
                                     key=b"k")
        garbage = f"\xff not an alert {unique}".encode("latin-1")
        absurd = pb.Alert(fingerprint="f" * 300 + unique, state=pb.ALERT_FIRING,
                          rule="r").SerializeToString()
        for value in (garbage, absurd, b""):
            await producer.send_and_wait("mlpe.alerts", value, key=f"bad{unique}".encode())
        node = f"wide-{unique}"  # a node-wide event: 60 alerts of one group
        for i in range(60):
            await producer.send_and_wait("mlpe.alerts", alert(f"w{i}{unique}", node=node,
                                                              rule=f"rule{i}"))
        hostile = pb.Alert(fingerprint=f"h{unique}", rule="r", state=pb.ALERT_FIRING,
                           summary=f"{HOSTILE}{unique}" + "x" * 10_000,
                           labels={"node": f"<!here>{unique}"}).SerializeToString()
        await producer.send_and_wait("mlpe.alerts", hostile)
        wanted = {garbage: "not an Alert", absurd: "characters, at most 256",
                  b"": "empty message"}
        found = {}
        # Other notifiers on the shared stack (their own groups) may refuse the same
        # bytes: a letter counts when it has this notifier's reason and time.
        async with asyncio.timeout(60):
            while len(found) < len(wanted):
                for records in (await letters.getmany(timeout_ms=1000)).values():
                    for r in records:
                        d = deadletter_pb2.DeadLetter.FromString(r.value)
                        if (d.key == f"bad{unique}".encode() and d.value in wanted
                                and wanted[d.value] in d.reason and d.refused_at.seconds):
                            found[d.value] = d
        for letter in found.values():
            assert letter.refused_by == "notify" and letter.source_topic == "mlpe.alerts"
            assert letter.source_offset >= 0
        # The 60 of one group go out 24 per message: 3 messages when all arrive within
        # one group wait, more when a loaded machine spreads their sending over several.
        deadline = time.monotonic() + 60
        while True:
            mine = await posts_about(base, unique, 1 + 3 + 1, proc, log)
            wide = [a for a in sent_alerts(mine) if a[2].get("node") == node]
            wide_posts = [p for p in mine if any(a[2].get("node") == node
                                                 for a in parse_message(p["body"]))]
            # All 60, and the other two posts too (they may come after the group's).
            if (len(wide) >= 60 and len(mine) - len(wide_posts) >= 2) or \
                    time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert len(wide_posts) >= 3 and len(mine) == 2 + len(wide_posts), \
            log.read_text()[-2000:]
        assert_within_slack_limits(mine)
        assert sorted(t for t, *_ in wide) == sorted(f"rule{i} on {node}" for i in range(60))
        assert "<!" not in "".join(p["body"] for p in mine)
        assert [a["status"] for a in (await received(base))["attempts"]
                if unique in a["body"]] == [200] * len(mine)  # none refused
    finally:
        await letters.stop()
        await producer.stop()
        await asyncio.to_thread(stop_gracefully, proc, "mlpe notify")  # the sink serves
        # on this event loop: a blocking wait would leave a delivery in flight unanswered
        await runner.cleanup()


async def test_sigterm_while_the_webhook_fails_stops_soon_and_keeps_the_alert(stack_endpoints,
                                                                             unique, tmp_path):
    """A webhook answering 500 used to hold a SIGTERM for the whole retry schedule (up to
    minutes); now the notifier stops in seconds and the alert, committed in Kafka but not
    sent, waits in Redis: the next start sends it."""
    failing, failing_base = await start_sink(fail=[500] * 1000)
    log = tmp_path / "notify.log"
    proc = start_mlpe("notify", "--group-wait", "0.1", env=notify_env(failing_base, unique),
                      log=log)
    producer = AIOKafkaProducer(bootstrap_servers=stack_endpoints.kafka_bootstrap)
    await producer.start()
    healthy = None
    try:
        wait_group_stable(stack_endpoints.kafka_bootstrap, f"test-notify-{unique}", 1, [proc])
        await producer.send_and_wait("mlpe.alerts", alert(f"s{unique}", node=f"n-{unique}"))
        deadline = time.monotonic() + 60
        while not (await received(failing_base))["attempts"]:  # a delivery is in flight
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
            await asyncio.sleep(0.1)
        await asyncio.to_thread(stop_gracefully, proc, "mlpe notify", 10)
        assert "cancelled; its alerts are kept" in log.read_text()
        healthy, base = await start_sink()
        again = start_mlpe("notify", "--group-wait", "0.1", env=notify_env(base, unique),
                           log=log)
        try:
            mine = await posts_about(base, unique, 1, again, log)
            assert len(mine) == 1, log.read_text()[-2000:]
        finally:
            await asyncio.to_thread(stop_gracefully, again, "mlpe notify")
    finally:
        await producer.stop()
        await failing.cleanup()
        if healthy is not None:
            await healthy.cleanup()
