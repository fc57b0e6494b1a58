"""`mlpe notify`: consume mlpe.alerts, deliver through the routes; `mlpe webhook-sink`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from mlpe.common import logs
from mlpe.common.settings import Settings
from mlpe.common.topics import ALERTS


def register(sub: argparse._SubParsersAction) -> None:
    from mlpe.notify import sink

    p = sub.add_parser(
        "notify",
        help="deliver alerts to Slack webhooks: grouped, deduplicated, rate-limited (Redis)",
        description="Consumes mlpe.alerts and posts Slack incoming-webhook messages. The "
        "default route posts to $MLPE_SLACK_WEBHOOK_URL (or $SLACK_WEBHOOK_URL); --routes "
        "adds routes by severity and labels, each naming the variable that holds its URL.",
    )
    p.add_argument("--routes", default=None, metavar="FILE",
                   help="routes YAML (default $MLPE_NOTIFY_ROUTES; none: everything to default)")
    p.add_argument("--group-wait", type=float, default=1.0,
                   help="seconds to gather alerts of one group into one message (1)")
    p.add_argument("--repeat-interval", type=float, default=4 * 3600.0,
                   help="seconds before a still-firing alert is sent again (14400)")
    p.set_defaults(func=run)
    sink.register(sub)


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` unless told to stop; True if stopping."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


async def handle(notifier, record, stop: asyncio.Event, log) -> bool:
    """One record recorded in Redis or dead-lettered: True; False if stopping first (the
    record is then not committed, the next start reads it again)."""
    import redis.asyncio as aioredis

    from mlpe.notify.notifier import Source, reason_of

    source = Source(record.topic, record.partition, record.offset, record.key or b"")
    while True:
        try:
            await notifier.receive(record.value, source)
            return True
        except aioredis.RedisError as err:  # not the message's fault: keep it, try again
            log.warning("redis unavailable; retrying the alert", error=reason_of(err),
                        offset=record.offset)
        except Exception as err:  # noqa: BLE001 (one message must never stop the notifier)
            try:
                await notifier.refuse(source, record.value or b"", reason_of(err))
                return True
            except Exception as failed:  # noqa: BLE001 (Kafka down: keep it, try again)
                log.warning("dead letter not sent; retrying", error=reason_of(failed),
                            offset=record.offset)
        if await _wait(stop, 1.0):
            return False


async def consume(settings: Settings, notifier, stop: asyncio.Event, log) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(ALERTS.name, bootstrap_servers=settings.kafka_bootstrap,
                                group_id=settings.notify_group_id,
                                enable_auto_commit=False,
                                # A new group reads what is retained, unless told otherwise.
                                auto_offset_reset=settings.notify_start)
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            done = {}
            for tp, records in batch.items():
                for r in records:
                    if not await handle(notifier, r, stop, log):
                        break
                    done[tp] = r.offset + 1
            if done:
                await consumer.commit(done)  # recorded in Redis or dead-lettered
    finally:
        with contextlib.suppress(Exception):  # never hang a shutdown on a stuck client
            await asyncio.wait_for(consumer.stop(), timeout=3)


async def serve(settings: Settings, args, log) -> None:
    import redis.asyncio as aioredis
    from aiokafka import AIOKafkaProducer

    from mlpe.common.topics import DEAD_LETTER
    from mlpe.notify.notifier import Notifier, Timing, dead_letter_bytes
    from mlpe.notify.routes import load

    routes = load(args.routes or settings.notify_routes)
    redis = aioredis.Redis.from_url(settings.redis_url)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()

    def webhook_url(name: str) -> str | None:
        """A route's webhook; the default route's falls back to $SLACK_WEBHOOK_URL."""
        if name == routes.default.webhook_env:
            return settings.secret(name) or settings.slack_webhook_url
        return settings.secret(name)

    async def dead_letter(source, value: bytes, reason: str) -> None:
        await asyncio.wait_for(producer.send_and_wait(
            DEAD_LETTER.name, dead_letter_bytes(source, value, reason),
            key=source.topic.encode()), timeout=10)

    notifier = Notifier(redis, routes, webhook_url,
                        Timing(group_wait_s=args.group_wait,
                               repeat_interval_s=args.repeat_interval),
                        prefix=settings.notify_redis_prefix, dead_letter=dead_letter)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("notify starting", routes=[r.name for r in routes.routes] + ["default"])
    try:
        await asyncio.gather(consume(settings, notifier, stop, log),
                             notifier.deliver_forever(stop))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), timeout=3)
        await redis.aclose()
        log.info("notify stopped", **notifier.counters)


def run(args, settings: Settings) -> int:
    from mlpe.notify.routes import RoutesError

    log = logs.configure("notify", settings.log_level, settings.log_format)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    try:
        asyncio.run(serve(settings, args, log))
    except RoutesError as err:
        print(f"mlpe notify: {err}", file=sys.stderr)
        return 2
    return 0
