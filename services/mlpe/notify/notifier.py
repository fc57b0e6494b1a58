"""`mlpe notify`: alerts from Kafka to Slack webhooks, grouped, deduplicated, rate-limited.

Like Alertmanager, but with its state in Redis so a restart forgets nothing:
- an alert's state (firing / resolved, when last notified) lives under its
  fingerprint: the same firing alert again is dropped until `repeat_interval`;
  a resolve is sent only for something that was notified as firing;
- alerts of one group (node + job by default: one incident's symptoms) that
  arrive within `group_wait` go out as one message;
- each webhook gets on average one post per second, in bursts of up to BURST;
  429 and 5xx are retried with backoff, honouring Retry-After.
The Kafka offset is committed once the alert is recorded in Redis, so what is
pending survives a crash of the notifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from mlpe.notify.routes import Route, Routes
from mlpe.notify.slack import WebhookError, format_message, post
from mlpe.v1 import alerts_pb2

log = logging.getLogger("mlpe.notify")
PREFIX = "mlpe:notify"
BURST = 4  # posts a webhook may take at once (Slack allows short bursts over 1/s)


@dataclass
class Timing:
    group_wait_s: float = 1.0
    repeat_interval_s: float = 4 * 3600.0
    min_post_interval_s: float = 1.0   # per webhook (Slack allows about one per second)


def group_key(alert: alerts_pb2.Alert, group_by: tuple[str, ...]) -> str:
    return "|".join(f"{k}={alert.labels.get(k, '')}" for k in group_by)


class Notifier:
    def __init__(self, redis: aioredis.Redis, routes: Routes,
                 secret: Callable[[str], str | None], timing: Timing | None = None,
                 group_by: tuple[str, ...] = ("node", "job"), prefix: str = PREFIX):
        self.redis = redis
        self.secret = secret  # webhook variable name -> URL (Settings.secret)
        self.prefix = prefix  # Redis key prefix: separate notifiers (tests) never mix
        self.routes = routes
        self.timing = timing or Timing()
        self.group_by = group_by
        self.counters = {"received": 0, "deduplicated": 0, "sent": 0, "failed_posts": 0,
                         "invalid": 0}

    # -- intake (called per Kafka record) ----------------------------------------------
    async def receive(self, raw: bytes) -> str:
        """Record one alert; returns what happened ("queued", "duplicate", ...)."""
        try:
            alert = alerts_pb2.Alert.FromString(raw)
        except DecodeError as err:
            self.counters["invalid"] += 1
            raise ValueError(f"not an Alert: {err}") from None
        if not alert.fingerprint or alert.state not in (alerts_pb2.ALERT_FIRING,
                                                         alerts_pb2.ALERT_RESOLVED):
            self.counters["invalid"] += 1
            raise ValueError("Alert needs a fingerprint and a state (firing or resolved)")
        self.counters["received"] += 1
        key = f"{self.prefix}:alert:{alert.fingerprint}"
        state = await self.redis.hgetall(key)
        firing = alert.state == alerts_pb2.ALERT_FIRING
        now = time.time()
        if firing and state.get(b"state") == b"firing":
            # Queued but not yet sent counts as notified: the message is on its way.
            last = float(state.get(b"notified_at") or state.get(b"updated_at") or 0)
            if now - last < self.timing.repeat_interval_s:
                self.counters["deduplicated"] += 1
                return "duplicate"
        if not firing and state.get(b"state") != b"firing":
            self.counters["deduplicated"] += 1
            return "resolve-of-unknown"
        entry = json.dumps({"alert": MessageToDict(alert, preserving_proto_field_name=True),
                            "raw": raw.hex()})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"state": "firing" if firing else "resolved",
                                    "updated_at": now})
            pipe.expire(key, int(self.timing.repeat_interval_s * 2) + 86_400)
            for route in self.routes.match(alert):
                group = f"{route.name}|{group_key(alert, self.group_by)}"
                pipe.rpush(f"{self.prefix}:group:{group}", entry)
                pipe.zadd(f"{self.prefix}:due", {group: now + self.timing.group_wait_s}, nx=True)
            await pipe.execute()
        return "queued"

    # -- delivery (a loop) ----------------------------------------------------------------
    async def deliver_due(self) -> int:
        """Send every group whose wait is over; returns messages sent."""
        sent = 0
        due = await self.redis.zrangebyscore(f"{self.prefix}:due", "-inf", time.time())
        for group_b in due:
            group = group_b.decode()
            route = self.routes.by_name(group.split("|", 1)[0])
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lrange(f"{self.prefix}:group:{group}", 0, -1)
                pipe.delete(f"{self.prefix}:group:{group}")
                pipe.zrem(f"{self.prefix}:due", group)
                entries, _, _ = await pipe.execute()
            if not entries or route is None:
                continue
            alerts = [alerts_pb2.Alert.FromString(bytes.fromhex(json.loads(e)["raw"]))
                      for e in entries]
            if await self._post(route, alerts):
                sent += 1
            else:  # keep them: put back and try again later, nothing is lost
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.lpush(f"{self.prefix}:group:{group}", *reversed(entries))
                    pipe.zadd(f"{self.prefix}:due", {group: time.time() + 30})
                    await pipe.execute()
        return sent

    async def _post(self, route: Route, alerts: list[alerts_pb2.Alert]) -> bool:
        url = route.webhook_url(self.secret)
        if url is None:
            log.error("route %s: webhook variable %s is not set; alerts kept for later",
                      route.name, route.webhook_env)
            return False
        # On average one post per webhook per interval, in bursts of up to BURST, across
        # notifier processes: a counter per window of BURST intervals.
        window_s = self.timing.min_post_interval_s * BURST
        while True:
            gate = f"{self.prefix}:gate:{route.name}:{int(time.time() // window_s)}"
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(gate)
                pipe.expire(gate, int(window_s) + 2)
                count, _ = await pipe.execute()
            if count <= BURST:
                break
            await asyncio.sleep(0.05)
        try:
            await post(url, format_message(alerts))
        except WebhookError as err:
            self.counters["failed_posts"] += 1
            log.error("route %s: %s", route.name, err)
            return False
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for alert in alerts:
                if alert.state == alerts_pb2.ALERT_FIRING:
                    pipe.hset(f"{self.prefix}:alert:{alert.fingerprint}", "notified_at", now)
            await pipe.execute()
        self.counters["sent"] += 1
        return True

    async def deliver_forever(self, stop: asyncio.Event, every_s: float = 0.1) -> None:
        while not stop.is_set():
            try:
                await self.deliver_due()
            except aioredis.RedisError as err:
                log.warning("redis unavailable (%s); retrying", err)
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every_s)
