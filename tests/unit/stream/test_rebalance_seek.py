"""The rebalance workaround: a stream partition that Faust's recovery resumes is fetched
only after its seek to the committed offset (app.seek_stream_partitions_before_fetching;
the kill -9 test in tests/integration/test_stream.py shows the loss it prevents)."""

from types import SimpleNamespace

from aiokafka import TopicPartition
from faust.types import TP

from mlpe.stream.app import seek_stream_partitions_before_fetching

STREAM, CHANGELOG = TP("mlpe.metrics.gpu", 3), TP("app-gpu-series-changelog", 3)


class Client:
    """What the Kafka client is told, in order."""

    def __init__(self, calls):
        self.calls = calls

    def assignment(self):
        return {TopicPartition(*STREAM), TopicPartition(*CHANGELOG)}

    def pause(self, *tps):
        self.calls.append(("client pause", set(tps)))

    def resume(self, *tps):
        self.calls.append(("client resume", set(tps)))


def fake_app(calls):
    client = Client(calls)
    thread = SimpleNamespace(_ensure_consumer=lambda: client,
                             thread_loop=SimpleNamespace(call_soon_threadsafe=lambda f: f()))
    consumer = SimpleNamespace(
        _thread=thread, assignment=lambda: {STREAM, CHANGELOG},
        resume_partitions=lambda tps: calls.append(("faust resume", set(tps))),
        resume_flow=lambda: calls.append(("flow", None)))
    return SimpleNamespace(consumer=consumer,
                           tables=SimpleNamespace(changelog_topics={CHANGELOG.topic}))


def test_stream_partitions_wait_for_the_flow_changelogs_do_not():
    calls = []
    app = fake_app(calls)
    seek_stream_partitions_before_fetching(app)
    seek_stream_partitions_before_fetching(app)  # a second rebalance wraps nothing twice
    app.consumer.resume_partitions({CHANGELOG})
    assert calls == [("faust resume", {CHANGELOG})]
    calls.clear()
    app.consumer.resume_partitions({STREAM})  # recovery, just before its seek
    assert calls == [("client pause", {TopicPartition(*STREAM)})]
    app.consumer.resume_flow()  # after the seek and the clearing of the queues
    assert calls[1:] == [("flow", None), ("faust resume", {STREAM}),
                         ("client resume", {TopicPartition(*STREAM)})]
    calls.clear()
    app.consumer.resume_flow()  # nothing held any more
    assert calls == [("flow", None)]
