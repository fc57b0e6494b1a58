"""`mlpe stream`: the Faust app that turns telemetry into InfluxDB aggregates and alerts.

Topics, tables and agents are declared at module level, Faust style:
- `aggregate`: metric batches -> 1 s / 10 s windows in InfluxDB; Xid/ECC/throttle
  events and threshold rules -> alerts at once. Each closed 1 s GPU window's means
  go to mlpe.stream.gpu-seconds, keyed by job.
- `detect_gpus`: those means -> statistical baseline, memory-leak trend and
  cross-peer detectors, their state in the tables `gpu-series` and `peer-groups`.
- `train_steps`: TrainStep events -> 1 s / 10 s windows per job and rank, and the
  training detectors, state in the table `train-jobs`; `watch_stalls` notices jobs
  that stopped stepping.
Offsets of metric batches and steps are acknowledged only once every window they
contributed to is in InfluxDB, so a killed worker resumes from data whose windows
were not yet written, recomputes them and overwrites (same series, same
timestamp): nothing missing, nothing doubled. Table state is in changelog topics:
a restarted worker resumes it instead of re-learning. Anything undecodable or
invalid goes to the dead-letter topic with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from typing import ClassVar

import faust
import numpy as np
from faust.types import TP
from google.protobuf.timestamp_pb2 import Timestamp

from mlpe.common import batches
from mlpe.common import settings as settings_module
from mlpe.common.alerts import fingerprint
from mlpe.common.topics import (
    ALERTS,
    DEAD_LETTER,
    GPU_METRICS,
    GPU_SECONDS,
    HOST_METRICS,
    TRAIN_EVENTS,
    of_app,
)
from mlpe.stream import rules as rules_module
from mlpe.stream.detectors import baseline, peers, training, trend
from mlpe.stream.detectors import events as events_detector
from mlpe.stream.influx import InfluxWriter, alert_line
from mlpe.stream.windows import TRAIN_KIND, WindowSet
from mlpe.v1 import alerts_pb2, deadletter_pb2, metrics_pb2, training_pb2

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
    # Each table partition lives on its owner only; a restart recovers it from the changelog.
    table_standby_replicas=0,
)
metric_topics = app.topic(GPU_METRICS.name, HOST_METRICS.name, value_type=bytes,
                          value_serializer="raw", key_serializer="raw")
alerts_topic = app.topic(ALERTS.name, value_type=bytes, value_serializer="raw",
                         key_serializer="raw")
dead_letters = app.topic(DEAD_LETTER.name, value_type=bytes, value_serializer="raw",
                         key_serializer="raw")
gpu_seconds = app.topic(of_app(GPU_SECONDS, settings.stream_app_id).name, internal=True,
                        partitions=GPU_SECONDS.partitions,
                        retention=GPU_SECONDS.retention_ms / 1000, value_type=bytes,
                        value_serializer="raw", key_serializer="raw")
train_topic = app.topic(TRAIN_EVENTS.name, value_type=bytes, value_serializer="raw",
                        key_serializer="raw")

# Detector state, co-partitioned with the topic that feeds it.
# Plain JSON both ways (no model types: Faust would look for Record.from_data on recovery).
STATE = faust.Schema(key_serializer="json", value_serializer="json")
gpu_series = app.Table("gpu-series", default=dict, partitions=GPU_SECONDS.partitions,
                       schema=STATE)   # node/gpu -> baseline and trend state
peer_groups = app.Table("peer-groups", default=dict, partitions=GPU_SECONDS.partitions,
                        schema=STATE)  # job -> cross-peer state
train_jobs = app.Table("train-jobs", default=dict, partitions=TRAIN_EVENTS.partitions,
                       schema=STATE)   # job -> training detector state

IDLE_S = 2.0  # a partition silent this long gets its open windows written anyway
WINDOWS = [WindowSet(width, settings.stream_lateness_s, IDLE_S) for width in (1.0, 10.0)]
EARLIEST_NS = 1_577_836_800 * 10**9  # 2020-01-01: anything older is a broken clock
FUTURE_S = 86_400                    # more than a day ahead: a broken clock too
writer = InfluxWriter(settings)
counters = {"batches": 0, "values": 0, "steps": 0, "dead_letters": 0, "windows_written": 0,
            "alerts": 0}
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
            fingerprint=fingerprint(rule.name, batch.node_id, labels.get("gpu", "")),
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


async def publish(alerts: list[alerts_pb2.Alert]) -> None:
    """To mlpe.alerts for the notifier, and to InfluxDB with the next windows for Grafana."""
    for alert in alerts:
        await alerts_topic.send(key=alert.fingerprint.encode(), value=alert.SerializeToString())
        annotations.append(alert_line(alert))
        counters["alerts"] += 1


def ack_in_order(event) -> None:
    """Acknowledge an event that joins no window, after the earlier ones of its partition."""
    hold = Hold(event)
    hold.refs = 1
    hold.release()


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
            ack_in_order(event)
            continue
        await publish([*events_detector.detect(batch, time.time_ns(), throttle_masks),
                       *evaluate_rules(batch)])
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


def gpu_second_reports(closed) -> list[tuple[str, dict]]:
    """Closed 1 s GPU windows as one report per (job, node, second): (job, report)."""
    reports: dict[tuple, dict] = {}
    for c in closed:
        if c.kind != metrics_pb2.DEVICE_KIND_GPU or c.end_ns - c.start_ns != 10**9:
            continue
        report = reports.setdefault((c.job, c.node, c.start_ns), {
            "job": c.job, "node": c.node, "start_ns": c.start_ns, "gpus": {}})
        report["gpus"][str(c.device)] = {k: (v if math.isfinite(v) else None)
                                         for k, v in c.means.items() if k in SECOND_FIELDS}
    return [(job, report) for (job, _, _), report in reports.items()]


SECOND_FIELDS = {*peers.FIELDS, *baseline.WATCHED, "mem_used", "mem_total"}
peer_buckets: dict[str, peers.Buckets] = {}  # job -> the seconds not yet judged


def parse_report(raw: bytes) -> dict:
    try:
        report = json.loads(raw)
        node, start, gpus = report["node"], int(report["start_ns"]), report["gpus"]
        if not isinstance(node, str) or not node or not isinstance(gpus, dict):
            raise TypeError("node must be a non-empty string and gpus a mapping")
        for values in gpus.values():
            if not isinstance(values, dict) or not all(
                    v is None or isinstance(v, int | float) for v in values.values()):
                raise TypeError("each GPU's values must be a mapping of numbers")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"not a GPU-seconds report: {type(err).__name__}: {err}") from None
    report["start_ns"], report["job"] = start, str(report.get("job") or "")
    return report


@app.agent(gpu_seconds)
async def detect_gpus(stream):
    """Baseline, trend and cross-peer detectors over each GPU's 1 s means."""
    async for event in stream.events():
        try:
            report = parse_report(event.value)
        except ValueError as err:
            await dead_letter(event, str(err))
            continue
        now_ns, node, start, found = time.time_ns(), report["node"], report["start_ns"], []
        for gpu, values in report["gpus"].items():
            values = {k: (math.nan if v is None else float(v)) for k, v in values.items()}
            member = f"{node}/{gpu}"
            state = gpu_series[member]
            if start <= state.get("t", 0):
                continue  # replayed after a crash: already learned
            stat_state, stat_alerts = baseline.step(state.get("baseline"), node, gpu, start,
                                                    values, now_ns)
            trend_state, trend_alerts = trend.step(
                state.get("trend"), node, gpu, start, values.get("mem_used", math.nan),
                values.get("mem_total", math.nan), now_ns)
            gpu_series[member] = {"t": start, "baseline": stat_state, "trend": trend_state}
            found += stat_alerts + trend_alerts
        job = report["job"]
        buckets = peer_buckets.setdefault(job, peers.Buckets())
        buckets.add(report)
        group = peer_groups[job]
        ready = buckets.ready(group.get("last_start", 0))
        for second, members in ready:
            group, peer_alerts = peers.evaluate(group, second, members, now_ns)
            found += peer_alerts
        if ready:
            peer_groups[job] = group
        await publish(found)


class StepRow:
    """One TrainStep as a one-sample batch of a "device" (job, rank) for WindowSet."""
    FIELDS = ("loss", "tokens_per_s", "step_time_s", "grad_norm", "mem_allocated_gib")

    def __init__(self, msg: training_pb2.TrainStep):
        self.node_id, self.job_id = msg.job_id, msg.job_id
        self.device_kind, self.device_index = TRAIN_KIND, msg.rank
        self.timestamps_ns = np.array([msg.time_ns], dtype=np.int64)
        self.samples = 1
        self._matrix = (self.FIELDS, np.array([[msg.loss, msg.tokens_per_s, msg.step_time_s,
                                                msg.grad_norm, msg.mem_allocated_bytes / 2**30]]))

    def matrix(self):
        return self._matrix


def parse_step(raw: bytes) -> training_pb2.TrainStep:
    """A TrainStep, checked; the loss may be NaN or inf (that is what we watch for)."""
    try:
        msg = training_pb2.TrainStep.FromString(raw)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
        raise ValueError(f"not a TrainStep: {err}") from None
    problems = []
    if not msg.job_id:
        problems.append("job_id is empty")
    if msg.rank < 0 or msg.world_size < 1 or msg.rank >= msg.world_size:
        problems.append(f"rank {msg.rank} does not fit world_size {msg.world_size}")
    if msg.halt and msg.halt not in training.HALTS:
        problems.append(f"halt {msg.halt!r} is not one of {', '.join(training.HALTS)}")
    if msg.step < (0 if msg.halt else 1):  # a rank may halt before its first step
        problems.append(f"step {msg.step} is not {0 if msg.halt else 1} or more")
    if not EARLIEST_NS <= msg.time_ns <= time.time_ns() + FUTURE_S * 10**9:
        problems.append(f"time_ns {msg.time_ns} is not a plausible time")
    for name in () if msg.halt else ("tokens_per_s", "step_time_s"):
        value = getattr(msg, name)
        if not math.isfinite(value) or value < 0:
            problems.append(f"{name} {value} is not a finite number >= 0")
    if problems:
        raise ValueError("TrainStep: " + "; ".join(problems))
    return msg


stalled_jobs: set[str] = set()  # in memory: a restart may re-fire, the notifier dedups


@app.agent(train_topic)
async def train_steps(stream):
    """Training aggregates per job and rank, and the training detectors."""
    async for event in stream.noack().events():
        try:
            msg = parse_step(event.value)
        except ValueError as err:
            await dead_letter(event, str(err))
            ack_in_order(event)
            continue
        now_ns = time.time_ns()
        if msg.halt:  # not a step: the job stopped on purpose, its silence is no stall
            state = training.halt(train_jobs[msg.job_id] or None, msg)
            if state is not None:
                train_jobs[msg.job_id] = state
            if state is not None and msg.job_id in stalled_jobs:
                stalled_jobs.discard(msg.job_id)
                await publish([training.stall_alert(msg.job_id, state, now_ns, stalled=True)])
            ack_in_order(event)
            continue
        state, found = training.step(train_jobs[msg.job_id] or None, msg, now_ns)
        train_jobs[msg.job_id] = state
        if msg.job_id in stalled_jobs:
            resolved = training.stall_alert(msg.job_id, state, now_ns, stalled=True)
            if resolved is not None:
                stalled_jobs.discard(msg.job_id)
                found.append(resolved)
        await publish(found)
        partition = (event.message.topic, event.message.partition)
        last_offsets[partition] = event.message.offset
        hold = Hold(event)
        for windows in WINDOWS:
            hold.refs += windows.add(partition, StepRow(msg), hold)
        counters["steps"] += 1
        if hold.refs == 0:
            hold.refs = 1
            hold.release()


@app.timer(interval=1.0)
async def watch_stalls() -> None:
    """A stall is the absence of steps, so it is noticed by the clock, not by an event;
    never while this worker still has steps to read (it would only be behind)."""
    owned = [tp for tp in app.consumer.assignment() if tp.topic == TRAIN_EVENTS.name]
    if any(backlog((tp.topic, tp.partition)) for tp in owned):
        return
    await publish(new_stalls(time.time_ns()))


def new_stalls(now_ns: int) -> list[alerts_pb2.Alert]:
    """Firing stall alerts for the jobs that went quiet since the last look."""
    found = []
    for job, state in list(train_jobs.items()):
        if state and job not in stalled_jobs:
            alert = training.stall_alert(job, state, now_ns, stalled=False)
            if alert is not None:
                stalled_jobs.add(job)
                found.append(alert)
    return found


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
throttle_masks: dict[tuple[str, int], int] = {}  # (node, gpu) -> last throttle mask seen


async def write_once() -> None:
    closed = [c for windows in WINDOWS for c in windows.close_ready(backlog=backlog)]
    notes, annotations[:] = list(annotations), []
    if not closed and not notes:
        return
    for job, report in gpu_second_reports(closed):  # detectors first: they are the hurry
        await gpu_seconds.send(key=job.encode(), value=json.dumps(report).encode())
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
    duplicates = sum(w.duplicate_samples for w in WINDOWS)
    delays = np.array(close_delays) if close_delays else np.zeros(1)
    arrivals = np.array(arrival_delays) if arrival_delays else np.zeros(1)
    log.info("stream stats: %s late_samples=%d duplicate_samples=%d "
             "window_written_after_end_p50=%.2fs p99=%.2fs batch_arrival_p50=%.2fs p99=%.2fs",
             counters, late, duplicates, np.percentile(delays, 50),
             np.percentile(delays, 99), np.percentile(arrivals, 50), np.percentile(arrivals, 99))
