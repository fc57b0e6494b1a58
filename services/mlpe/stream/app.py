"""`mlpe stream`: the Faust app that turns metric batches into InfluxDB aggregates.

Topics and agents are declared at module level, Faust style. Offsets are
acknowledged only once every window a batch contributed to is in InfluxDB, so a
killed worker resumes from data whose windows were not yet written, recomputes
them and overwrites (same series, same timestamp): nothing missing, nothing
doubled. Undecodable batches go to the dead-letter topic with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import ClassVar

import faust
import numpy as np
from faust.types import TP
from google.protobuf.timestamp_pb2 import Timestamp

from mlpe.common import batches
from mlpe.common import settings as settings_module
from mlpe.common.topics import ALERTS, DEAD_LETTER, GPU_METRICS, HOST_METRICS
from mlpe.stream import rules as rules_module
from mlpe.stream.detectors import events as events_detector
from mlpe.stream.influx import InfluxWriter, alert_line
from mlpe.stream.windows import WindowSet
from mlpe.v1 import alerts_pb2, deadletter_pb2, metrics_pb2

log = logging.getLogger("mlpe.stream")
settings = settings_module.load()
(settings.state_dir / "stream").mkdir(parents=True, exist_ok=True)  # Faust's datadir

app = faust.App(
    settings.stream_app_id,
    broker=f"kafka://{settings.kafka_bootstrap}",
    value_serializer="raw",
    store="memory://",
    web_enabled=False,
    consumer_auto_offset_reset=settings.stream_start,
    broker_commit_interval=1.0,
    # Events are held until their windows are written; on shutdown or rebalance do not
    # wait for them: the next owner of the partition replays them from the last commit.
    stream_wait_empty=False,
    # A killed worker's partitions move to the others after this, not after 60 s.
    broker_session_timeout=10.0,
    broker_heartbeat_interval=1.0,
    datadir=str(settings.state_dir / "stream"),
    topic_partitions=GPU_METRICS.partitions,
)
metric_topics = app.topic(GPU_METRICS.name, HOST_METRICS.name, value_type=bytes,
                          value_serializer="raw", key_serializer="raw")
alerts_topic = app.topic(ALERTS.name, value_type=bytes, value_serializer="raw",
                         key_serializer="raw")
dead_letters = app.topic(DEAD_LETTER.name, value_type=bytes, value_serializer="raw",
                         key_serializer="raw")

IDLE_S = 2.0  # a partition silent this long gets its open windows written anyway
WINDOWS = [WindowSet(width, settings.stream_lateness_s, IDLE_S) for width in (1.0, 10.0)]
EARLIEST_NS = 1_577_836_800 * 10**9  # 2020-01-01: anything older is a broken clock
FUTURE_S = 86_400                    # more than a day ahead: a broken clock too
writer = InfluxWriter(settings)
counters = {"batches": 0, "values": 0, "dead_letters": 0, "windows_written": 0, "alerts": 0}
close_delays: deque[float] = deque(maxlen=10_000)  # seconds from 1 s window end to written
arrival_delays: deque[float] = deque(maxlen=10_000)  # seconds from last sample to consumed


RULES = rules_module.load(settings.rules_path) if settings.rules_path else []
rule_states: dict[str, dict] = {}  # in memory: a restart re-arms hold timers (see README)


def evaluate_rules(batch: batches.Batch) -> list[alerts_pb2.Alert]:
    kind = "gpu" if batch.device_kind == metrics_pb2.DEVICE_KIND_GPU else "host"
    labels = {"node": batch.node_id}
    if kind == "gpu":
        labels["gpu"] = str(batch.device_index)
    out = []
    t_ns = int(batch.timestamps_ns[-1]) if batch.samples else 0
    for rule in RULES:
        values = batch.columns.get(rule.field)
        if rule.measurement != kind or values is None or not rule.matches(labels):
            continue
        value = rules_module.batch_stat(values, rule.stat)
        if value is None:
            continue
        key = f"{rule.name}|{batch.node_id}|{labels.get('gpu', '')}"
        rule_states[key], state = rules_module.step(rule, rule_states.get(key), value, t_ns)
        if state is None:
            continue
        hold = f"{rule.hold_s:g}s"
        text = dict(labels, gpu=labels.get("gpu", ""), value=value,
                    threshold=rule.threshold, **{"for": hold})
        firing = state == alerts_pb2.ALERT_FIRING
        since = rule_states[key]["since"] if firing else rule_states[key].get("last_since", 0)
        out.append(alerts_pb2.Alert(
            fingerprint=events_detector.fingerprint(rule.name, batch.node_id,
                                                    labels.get("gpu", "")),
            rule=rule.name, detector="rule", severity=rule.severity, state=state,
            labels=labels, value=value, threshold=rule.threshold, starts_at_ns=since,
            ends_at_ns=0 if firing else t_ns, detected_at_ns=time.time_ns(),
            summary=rules_module.render(rule.summary, **text),
            explanation=rules_module.render(rule.explanation, **text) if firing else
            f"Cleared: {rule.when} no longer holds (now {value:g})."))
    return out


class Hold:
    """One consumed event, acknowledged when the last window holding its data is written
    and every earlier event of its partition is acknowledged: acks stay contiguous, so the
    committed offset can never skip a held event (faust-streaming#312)."""
    __slots__ = ("event", "queue", "refs")
    queues: ClassVar[dict[tuple[str, int], deque]] = {}

    def __init__(self, event):
        self.event, self.refs = event, 0
        message = event.message
        self.queue = Hold.queues.setdefault((message.topic, message.partition), deque())
        self.queue.append(self)

    def release(self) -> None:
        self.refs -= 1
        if self.refs <= 0:
            while self.queue and self.queue[0].refs <= 0:
                self.queue.popleft().event.ack()


def validate(batch: batches.Batch) -> None:
    if batch.samples:
        first, last = int(batch.timestamps_ns[0]), int(batch.timestamps_ns[-1])
        if first < EARLIEST_NS or last > time.time_ns() + FUTURE_S * 10**9:
            raise batches.BatchError(
                f"MetricBatch: timestamps {first}..{last} ns are not a plausible time")


async def dead_letter(event, reason: str) -> None:
    message = event.message
    refused_at = Timestamp()
    refused_at.GetCurrentTime()
    letter = deadletter_pb2.DeadLetter(
        source_topic=message.topic, source_partition=message.partition,
        source_offset=message.offset, key=message.key or b"", value=message.value or b"",
        reason=reason, refused_by="stream", refused_at=refused_at)
    await dead_letters.send(key=message.topic.encode(), value=letter.SerializeToString())
    counters["dead_letters"] += 1
    log.warning("dead letter: %s (topic %s, partition %d, offset %d)", reason, message.topic,
                message.partition, message.offset)


@app.agent(metric_topics)
async def aggregate(stream):
    async for event in stream.noack().events():
        try:
            batch = batches.decode(event.value)
            validate(batch)
        except batches.BatchError as err:
            await dead_letter(event, str(err))
            refused = Hold(event)  # in order with the rest of its partition
            refused.refs = 1
            refused.release()
            continue
        for alert in [*events_detector.detect(batch, time.time_ns()), *evaluate_rules(batch)]:
            await alerts_topic.send(key=alert.fingerprint.encode(),
                                    value=alert.SerializeToString())
            annotations.append(alert_line(alert))
            counters["alerts"] += 1
        last_offsets[(event.message.topic, event.message.partition)] = event.message.offset
        hold = Hold(event)
        for windows in WINDOWS:
            hold.refs += windows.add((event.message.topic, event.message.partition), batch,
                                     hold)
        counters["batches"] += 1
        arrival_delays.append(time.time() - batch.timestamps_ns[-1] / 1e9 if batch.samples else 0)
        counters["values"] += batch.values
        if hold.refs == 0:  # every sample fell in windows already written
            hold.refs = 1
            hold.release()


@app.task
async def write_closed_windows() -> None:
    """Every 100 ms, write the windows that closed and release their events."""
    while not app.should_stop:
        await asyncio.sleep(0.1)
        await write_once()


last_offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> last offset processed


def backlog(partition: tuple[str, int]) -> bool:
    """Is there unread data on this partition? (Then silence is only us being busy.)"""
    try:
        highwater = app.consumer.highwater(TP(*partition))
    except Exception:  # noqa: BLE001 - not assigned or not known yet: assume busy
        return True
    return highwater is None or last_offsets.get(partition, -1) + 1 < highwater


annotations: list[str] = []  # alert points for Grafana, written with the next windows


async def write_once() -> None:
    closed = [c for windows in WINDOWS for c in windows.close_ready(backlog=backlog)]
    notes, annotations[:] = list(annotations), []
    if not closed and not notes:
        return
    await writer.write([c.line for c in closed] + notes)  # retries until InfluxDB takes them
    counters["windows_written"] += len(closed)
    now_ns = time.time_ns()
    close_delays.extend((now_ns - c.end_ns) / 1e9 for c in closed if c.end_ns - c.start_ns
                        == 10**9)
    for window in closed:
        for hold in window.tokens:
            hold.release()


@app.on_partitions_revoked.connect
async def forget_revoked(app, revoked, **kwargs) -> None:
    """Open windows of partitions we no longer own are dropped unwritten (never a partial
    window): their new owner replays those events from the last commit."""
    partitions = {(tp.topic, tp.partition) for tp in revoked}
    for windows in WINDOWS:
        windows.drop_partitions(partitions)
    for partition in partitions:
        Hold.queues.pop(partition, None)


@app.timer(interval=10.0)
async def report() -> None:
    late = sum(w.late_samples for w in WINDOWS)
    delays = np.array(close_delays) if close_delays else np.zeros(1)
    arrivals = np.array(arrival_delays) if arrival_delays else np.zeros(1)
    log.info("stream stats: %s late_samples=%d window_written_after_end_p50=%.2fs p99=%.2fs "
             "batch_arrival_p50=%.2fs p99=%.2fs", counters, late, np.percentile(delays, 50),
             np.percentile(delays, 99), np.percentile(arrivals, 50), np.percentile(arrivals, 99))
