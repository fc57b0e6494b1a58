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


async def consume(settings: Settings, notifier, stop: asyncio.Event, log) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from mlpe.common.topics import DEAD_LETTER
    from mlpe.v1 import deadletter_pb2

    consumer = AIOKafkaConsumer(ALERTS.name, bootstrap_servers=settings.kafka_bootstrap,
                                group_id=settings.notify_group_id,
                                enable_auto_commit=False,
                                # A new group reads what is retained, unless told otherwise.
                                auto_offset_reset=settings.notify_start)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    try:
                        await notifier.receive(r.value)
                    except ValueError as err:
                        letter = deadletter_pb2.DeadLetter(
                            source_topic=r.topic, source_partition=r.partition,
                            source_offset=r.offset, key=r.key or b"", value=r.value or b"",
                            reason=str(err), refused_by="notify")
                        await producer.send_and_wait(DEAD_LETTER.name, letter.SerializeToString(),
                                                     key=r.topic.encode())
                        log.warning("dead letter", reason=str(err), offset=r.offset)
            if batch:
                await consumer.commit()  # recorded in Redis: safe to move on
    finally:
        for client in (consumer, producer):  # never hang a shutdown on a stuck client
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), timeout=10)


async def serve(settings: Settings, args, log) -> None:
    import redis.asyncio as aioredis

    from mlpe.notify.notifier import Notifier, Timing
    from mlpe.notify.routes import load

    routes = load(args.routes or settings.notify_routes)
    redis = aioredis.Redis.from_url(settings.redis_url)
    def webhook_url(name: str) -> str | None:
        """A route's webhook; the default route's falls back to $SLACK_WEBHOOK_URL."""
        if name == routes.default.webhook_env:
            return settings.secret(name) or settings.slack_webhook_url
        return settings.secret(name)

    notifier = Notifier(redis, routes, webhook_url,
                        Timing(group_wait_s=args.group_wait,
                               repeat_interval_s=args.repeat_interval),
                        prefix=settings.notify_redis_prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("notify starting", routes=[r.name for r in routes.routes] + ["default"])
    try:
        await asyncio.gather(consume(settings, notifier, stop, log),
                             notifier.deliver_forever(stop))
    finally:
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
