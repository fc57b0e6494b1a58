"""The notifier's consumer on one record: whatever goes wrong, the record is recorded or
dead-lettered and the consumer goes on; Redis or Kafka down keeps the record (error paths,
with fakes: the real thing is in tests/integration/test_notify.py)."""

import asyncio
from types import SimpleNamespace

import redis.asyncio as aioredis

from mlpe.notify.main import handle
from mlpe.notify.notifier import Source


class FakeLog:
    def warning(self, *_a, **_k):
        pass


class FakeNotifier:
    def __init__(self, *errors):
        self.errors = list(errors)
        self.refused: list[tuple[Source, bytes, str]] = []
        self.refuse_errors: list[Exception] = []

    async def receive(self, raw, source):
        if self.errors:
            raise self.errors.pop(0)
        return "queued"

    async def refuse(self, source, value, reason):
        if self.refuse_errors:
            raise self.refuse_errors.pop(0)
        self.refused.append((source, value, reason))


RECORD = SimpleNamespace(topic="mlpe.alerts", partition=1, offset=7, key=b"k", value=b"v")


def run(notifier, stop=None):
    async def go():
        return await handle(notifier, RECORD, stop or asyncio.Event(), FakeLog())
    return asyncio.run(go())


def test_an_exception_inside_handling_is_a_dead_letter_with_its_type():
    notifier = FakeNotifier(KeyError("summary"))
    assert run(notifier) is True
    [(source, value, reason)] = notifier.refused
    assert source == Source("mlpe.alerts", 1, 7, b"k") and value == b"v"
    assert reason == "KeyError: 'summary'"


def test_a_refusal_keeps_its_own_reason():
    notifier = FakeNotifier(ValueError("not an Alert: Error parsing message"))
    assert run(notifier) is True
    assert notifier.refused[0][2] == "not an Alert: Error parsing message"


def test_redis_down_is_not_the_message_fault_it_is_tried_again():
    notifier = FakeNotifier(aioredis.ConnectionError("refused"))
    assert run(notifier) is True
    assert notifier.refused == []  # recorded on the second try, not dead-lettered


def test_kafka_down_for_the_dead_letter_keeps_the_record():
    notifier = FakeNotifier(ValueError("bad"), ValueError("bad"))
    notifier.refuse_errors = [RuntimeError("KafkaTimeoutError")]
    assert run(notifier) is True
    assert [r[2] for r in notifier.refused] == ["bad"]


def test_stopping_while_redis_is_down_leaves_the_record_uncommitted():
    stop = asyncio.Event()
    stop.set()
    notifier = FakeNotifier(aioredis.ConnectionError("refused"))
    assert run(notifier, stop) is False
