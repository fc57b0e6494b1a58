"""The notifier against real Redis and the real webhook sink (and Kafka end to end)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaProducer

from mlpe.common.kafka import wait_group_stable
from mlpe.notify.notifier import Notifier, Timing
from mlpe.notify.routes import Route, Routes
from mlpe.notify.sink import make_app
from mlpe.v1 import alerts_pb2 as pb
from tests.helpers import free_port, mlpe_env, start_mlpe, stop_gracefully


async def start_sink(fail=(), retry_after=None):
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


async def test_alerts_from_kafka_to_the_sink(stack_endpoints, unique, tmp_path):
    runner, base = await start_sink()
    env = mlpe_env(MLPE_SLACK_WEBHOOK_URL=f"{base}/hook",
                   MLPE_NOTIFY_GROUP_ID=f"test-notify-{unique}",
                   MLPE_NOTIFY_REDIS_PREFIX=f"test:{unique}",
                   # Only what this test sends: earlier alerts on the topic would queue first.
                   MLPE_NOTIFY_START="latest")
    proc = start_mlpe("notify", "--group-wait", "0.2", env=env, log=tmp_path / "notify.log")
    producer = AIOKafkaProducer(bootstrap_servers=stack_endpoints.kafka_bootstrap)
    await producer.start()
    try:
        wait_group_stable(stack_endpoints.kafka_bootstrap, f"test-notify-{unique}", 1, [proc])
        await producer.send_and_wait("mlpe.alerts", alert(f"k{unique}", node=f"node-{unique}"),
                                     key=b"k")
        await producer.send_and_wait("mlpe.alerts", b"\xff not an alert", key=b"bad")
        deadline = time.monotonic() + 60
        mine = []
        while time.monotonic() < deadline and not mine:
            assert proc.poll() is None, (tmp_path / "notify.log").read_text()[-2000:]
            mine = [g for g in (await received(base))["received"] if unique in g["body"]]
            await asyncio.sleep(0.2)
        assert len(mine) == 1, (tmp_path / "notify.log").read_text()[-2000:]
    finally:
        await producer.stop()
        await asyncio.to_thread(stop_gracefully, proc, "mlpe notify")  # the sink serves
        # on this event loop: a blocking wait would leave a delivery in flight unanswered
        await runner.cleanup()
