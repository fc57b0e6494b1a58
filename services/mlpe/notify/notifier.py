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
pending survives a crash of the notifier. A message that cannot be handled (not an
Alert, absurd fields, any exception) goes to mlpe.deadletter with the reason, and so does
a message the webhook refuses for good (HTTP 400/413): neither stops the notifier nor is
retried for ever. A large group goes out as several messages within Slack's limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from mlpe.notify.routes import Route, Routes
from mlpe.notify.slack import (
    ALERTS_PER_MESSAGE,
    WebhookError,
    WebhookRefused,
    format_messages,
    post,
)
from mlpe.v1 import alerts_pb2, deadletter_pb2

log = logging.getLogger("mlpe.notify")
PREFIX = "mlpe:notify"
BURST = 4  # posts a webhook may take at once (Slack allows short bursts over 1/s)
SOURCE_TOPIC = "mlpe.alerts"
# An alert beyond these is refused (dead letter): they become Redis keys and Slack text.
MAX_FINGERPRINT = 256
MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 1024
MAX_REASON = 500  # characters of a dead letter's reason


@dataclass
class Timing:
    group_wait_s: float = 1.0
    repeat_interval_s: float = 4 * 3600.0
    min_post_interval_s: float = 1.0   # per webhook (Slack allows about one per second)
    retry_after_failure_s: float = 30.0  # a group whose webhook failed is tried again then
    stop_grace_s: float = 3.0           # SIGTERM: a delivery in flight gets this long


@dataclass(frozen=True)
class Source:
    """Where a record came from: what a dead letter names."""
    topic: str = SOURCE_TOPIC
    partition: int = -1
    offset: int = -1
    key: bytes = b""


# (where the message came from, its bytes, why) -> published to mlpe.deadletter
DeadLetterSink = Callable[[Source, bytes, str], Awaitable[None]]


def dead_letter_bytes(source: Source, value: bytes, reason: str) -> bytes:
    """A DeadLetter as stream's refuse() builds one, refused_by "notify"."""
    refused_at = Timestamp()
    refused_at.GetCurrentTime()
    return deadletter_pb2.DeadLetter(
        source_topic=source.topic, source_partition=source.partition,
        source_offset=source.offset, key=source.key, value=value, reason=reason,
        refused_by="notify", refused_at=refused_at).SerializeToString()


def reason_of(err: BaseException) -> str:
    """One line a person can act on; the exception's type unless it is our own refusal."""
    text = str(err) if type(err) is ValueError else f"{type(err).__name__}: {err}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 1] + "…"


def group_key(alert: alerts_pb2.Alert, group_by: tuple[str, ...]) -> str:
    return "|".join(f"{k}={alert.labels.get(k, '')}" for k in group_by)


def check(alert: alerts_pb2.Alert) -> None:
    """Refuse (ValueError naming the field) an alert that cannot be stored or shown.
    Long summaries and explanations are not refused: they are clipped when shown."""
    if not alert.fingerprint or alert.state not in (alerts_pb2.ALERT_FIRING,
                                                     alerts_pb2.ALERT_RESOLVED):
        raise ValueError("Alert needs a fingerprint and a state (firing or resolved)")
    if len(alert.fingerprint) > MAX_FINGERPRINT:
        raise ValueError(f"Alert fingerprint has {len(alert.fingerprint)} characters, "
                         f"at most {MAX_FINGERPRINT}")
    if len(alert.labels) > MAX_LABELS:
        raise ValueError(f"Alert has {len(alert.labels)} labels, at most {MAX_LABELS}")
    for k, v in alert.labels.items():
        if not k or len(k) > MAX_LABEL_KEY or len(v) > MAX_LABEL_VALUE:
            raise ValueError(f"Alert label {k[:40]!r}: key 1-{MAX_LABEL_KEY} and value "
                             f"≤ {MAX_LABEL_VALUE} characters (key {len(k)}, value {len(v)})")
    format_messages([alert])  # what cannot be formatted is refused now, not at delivery


class Notifier:
    def __init__(self, redis: aioredis.Redis, routes: Routes,
                 secret: Callable[[str], str | None], timing: Timing | None = None,
                 group_by: tuple[str, ...] = ("node", "job"), prefix: str = PREFIX,
                 dead_letter: DeadLetterSink | None = None):
        self.redis = redis
        self.secret = secret  # webhook variable name -> URL (Settings.secret)
        self.prefix = prefix  # Redis key prefix: separate notifiers (tests) never mix
        self.routes = routes
        self.timing = timing or Timing()
        self.group_by = group_by
        self.dead_letter = dead_letter  # None: refusals are logged and counted only
        self.counters = {"received": 0, "deduplicated": 0, "sent": 0, "failed_posts": 0,
                         "invalid": 0, "refused_posts": 0, "dead_letters": 0}

    async def refuse(self, source: Source, value: bytes, reason: str) -> None:
        """`value` to the dead-letter topic with the reason (raises if that fails, so the
        caller keeps the message instead of losing it)."""
        if self.dead_letter is not None:
            await self.dead_letter(source, value, reason)
        self.counters["dead_letters"] += 1
        log.warning("dead letter: %s (topic %s, partition %d, offset %d)", reason,
                    source.topic, source.partition, source.offset)

    # -- intake (called per Kafka record) ----------------------------------------------
    async def receive(self, raw: bytes | None, source: Source | None = None) -> str:
        """Record one alert; returns what happened ("queued", "duplicate", ...).
        ValueError (the reason) for a message that is no acceptable Alert."""
        if not raw:
            self.counters["invalid"] += 1
            raise ValueError("empty message: no Alert")
        try:
            alert = alerts_pb2.Alert.FromString(raw)
        except DecodeError as err:
            self.counters["invalid"] += 1
            raise ValueError(f"not an Alert: {err}") from None
        try:
            check(alert)
        except ValueError:
            self.counters["invalid"] += 1
            raise
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
        source = source or Source()
        entry = json.dumps({"raw": raw.hex(), "src": [source.topic, source.partition,
                                                      source.offset, source.key.hex()]})
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
            sent += await self._deliver_group(group, route, entries)
        return sent

    async def _deliver_group(self, group: str, route: Route, entries: list[bytes]) -> int:
        """Post one claimed group as one or more messages. What is not sent (a webhook
        failure, a SIGTERM) goes back to Redis; what Slack refuses for good is
        dead-lettered. Returns messages sent."""
        items = []  # (entry, alert)
        for entry in entries:
            try:
                raw = bytes.fromhex(json.loads(entry)["raw"])
                alert = alerts_pb2.Alert.FromString(raw)
                format_messages([alert])
            except Exception as err:  # noqa: BLE001 (never stop delivery on one entry)
                await self._refuse_entry(entry, f"cannot deliver: {reason_of(err)}")
                continue
            items.append((entry, alert))
        parts = [items[i:i + ALERTS_PER_MESSAGE] for i in range(0, len(items),
                                                                ALERTS_PER_MESSAGE)]
        messages = format_messages([a for _, a in items]) if items else []
        sent = 0
        k = 0
        try:
            for k, (part, message) in enumerate(zip(parts, messages, strict=True)):
                outcome = await self._post(route, [a for _, a in part], message)
                if outcome == "sent":
                    sent += 1
                elif outcome == "refused":
                    for entry, _ in part:
                        await self._refuse_entry(entry, f"Slack webhook of route {route.name} "
                                                        "refused the message for good")
                else:  # keep them and the parts after: try again later, nothing is lost
                    await self._put_back(group, [e for p in parts[k:] for e, _ in p],
                                         self.timing.retry_after_failure_s)
                    break
        except asyncio.CancelledError:  # stopping: the next start sends what is left
            await self._put_back(group, [e for p in parts[k:] for e, _ in p], 0.0)
            raise
        return sent

    async def _put_back(self, group: str, entries: list[bytes], after_s: float) -> None:
        if not entries:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(f"{self.prefix}:group:{group}", *reversed(entries))
            pipe.zadd(f"{self.prefix}:due", {group: time.time() + after_s})
            await pipe.execute()

    async def _refuse_entry(self, entry: bytes, reason: str) -> None:
        try:
            data = json.loads(entry)
            raw = bytes.fromhex(data.get("raw", ""))
            topic, partition, offset, key = data.get("src") or (SOURCE_TOPIC, -1, -1, "")
            source = Source(str(topic), int(partition), int(offset), bytes.fromhex(key))
        except (ValueError, TypeError):
            raw, source = bytes(entry), Source()
        try:
            await self.refuse(source, raw, reason)
        except Exception as err:  # noqa: BLE001 (Kafka down: logged, delivery goes on)
            log.error("could not dead-letter an alert (%s): %s", reason, reason_of(err))

    async def _post(self, route: Route, alerts: list[alerts_pb2.Alert], message: dict) -> str:
        """"sent", "failed" (try again later) or "refused" (never sendable)."""
        url = route.webhook_url(self.secret)
        if url is None:
            log.error("route %s: webhook variable %s is not set; alerts kept for later",
                      route.name, route.webhook_env)
            return "failed"
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
            await post(url, message)
        except WebhookRefused as err:
            self.counters["refused_posts"] += 1
            log.error("route %s: %s; %d alert(s) dead-lettered, not retried", route.name, err,
                      len(alerts))
            return "refused"
        except WebhookError as err:
            self.counters["failed_posts"] += 1
            log.error("route %s: %s", route.name, err)
            return "failed"
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for alert in alerts:
                if alert.state == alerts_pb2.ALERT_FIRING:
                    pipe.hset(f"{self.prefix}:alert:{alert.fingerprint}", "notified_at", now)
            await pipe.execute()
        self.counters["sent"] += 1
        return "sent"

    async def deliver_forever(self, stop: asyncio.Event, every_s: float = 0.1) -> None:
        """Deliver until `stop`; a delivery in flight then gets Timing.stop_grace_s and is
        cancelled (what it had not sent goes back to Redis), so a stop takes seconds even
        while a webhook is being retried."""
        while not stop.is_set():
            work = asyncio.ensure_future(self.deliver_due())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not work.done():
                await asyncio.wait({work}, timeout=self.timing.stop_grace_s)
            if not work.done():
                work.cancel()
                log.warning("stopping: a delivery in flight was cancelled; its alerts are "
                            "kept for the next start")
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(work, timeout=self.timing.stop_grace_s)
                return
            try:
                work.result()
            except aioredis.RedisError as err:
                log.warning("redis unavailable (%s); retrying", err)
                await asyncio.sleep(1.0)
            except Exception:  # a bug must not end delivery for every other alert
                log.exception("delivery failed; retrying")
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every_s)
