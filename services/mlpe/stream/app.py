"""`mlpe stream`'s Faust app: telemetry in, InfluxDB aggregates and alerts out.

`StreamApp(settings)` declares, in order, the Faust app, its topics, its tables and
then its agents and timers, whose bodies are the methods below:
- `aggregate`: metric batches -> 1 s / 10 s windows in InfluxDB, and 1 min ones
  made of the 10 s ones (rollup.py); Xid/ECC/throttle
  events and threshold rules -> alerts at once. Each closed 1 s GPU window's means
  go to the app's own topic <app id>-gpu-seconds, keyed by job.
- `detect_gpus`: those means -> statistical baseline, memory-leak trend and
  cross-peer detectors, their state in the tables `gpu-series` and `peer-groups`.
- `train_steps`: TrainStep events -> 1 s / 10 s / 1 min windows per job and rank, and the
  training detectors, state in the table `train-jobs`; `watch_stalls` notices jobs
  that stopped stepping.
- `kernel_timings`: KernelSummary events -> the `kernel` measurement (kernels.py).
- `job_costs`: JobCost events from `mlpe control` -> the `cost` measurement (costs.py).
- `write_closed_windows`: writes the windows that closed and releases their events,
  which are acknowledged only then (acks.py: why a kill -9 loses no window).
- `follow_placements`: all of mlpe.placement, in every worker, so `aggregate` can give
  a GPU batch without a job the job whose processes run on that GPU (placement.py).
Table state is in changelog topics: a restarted worker resumes it instead of
re-learning. Anything undecodable or invalid goes to the dead-letter topic with the
reason (decoding.py). The rest of what a worker remembers is one StreamState.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import faust
import numpy as np
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from faust.exceptions import NotReady
from faust.types import TP
from google.protobuf.timestamp_pb2 import Timestamp

from mlpe.common import batches, prices
from mlpe.common.alerts import fingerprint
from mlpe.common.settings import Settings
from mlpe.common.topics import (
    ALERTS,
    COST_EVENTS,
    DEAD_LETTER,
    GPU_METRICS,
    GPU_SECONDS,
    HOST_METRICS,
    INVENTORY,
    KERNEL_EVENTS,
    PLACEMENT,
    TRAIN_EVENTS,
    metrics_group,
    of_app,
)
from mlpe.stream import rules
from mlpe.stream.acks import Consumed, Partition
from mlpe.stream.costs import cost_line
from mlpe.stream.decoding import (
    ClockError,
    Limits,
    StepRow,
    gpu_second_reports,
    parse_batch,
    parse_inventory,
    parse_placement,
    parse_report,
    parse_step,
)
from mlpe.stream.detectors import baseline, peers, training, trend
from mlpe.stream.detectors import events as events_detector
from mlpe.stream.fleet_cost import gpu_cost_lines, inventory_types
from mlpe.stream.influx import InfluxWriter, alert_line
from mlpe.stream.kernels import kernel_lines
from mlpe.stream.state import StreamState
from mlpe.stream.windows import escape_tag
from mlpe.v1 import alerts_pb2, deadletter_pb2

log = logging.getLogger("mlpe.stream")

# Detector state in tables: plain JSON both ways (no model types: Faust would look for
# Record.from_data on recovery).
TABLE_SCHEMA = faust.Schema(key_serializer="json", value_serializer="json")
PLACEMENT_WAIT_S = 30.0  # the longest the first batch waits for mlpe.placement to be read
PLACEMENT_RETRY_S = 5.0  # Kafka or the topic not there yet: look again this often
SERIES_SAVE_S = 10.0  # how often a GPU's detector state goes to its table (changelog)


def _raw_topic(app: faust.App, *names: str, **options) -> faust.TopicT:
    """A topic of bytes keyed by bytes: every payload is decoded by hand (decoding.py)."""
    return app.topic(*names, value_type=bytes, value_serializer="raw", key_serializer="raw",
                     **options)


def seek_stream_partitions_before_fetching(app: faust.App) -> None:
    """Fetch nothing of a rebalanced worker's stream partitions until they are sought.

    Faust's recovery marks them resumed, seeks them to their committed offsets, clears
    its queues and resumes the flow, while its fetcher, on a thread of its own, already
    runs for the changelogs and reads Faust's set of resumed partitions as that changes.
    Records fetched around the seek were dropped: taken from the Kafka client and
    skipped because their partition was not resumed yet, cleared with the queues, or
    read again after the seek and dropped as already read. A worker restarted after a
    kill -9 then lost from tens to hundreds of messages per partition (measured: 32,
    220, 487), and Faust counted them as a gap, acknowledged (compare faust issues 216
    and 221). So here a stream partition that recovery resumes is paused in the Kafka
    client itself (nothing of it is fetched, the seek empties what was), and both
    Faust and the client resume it at `resume_flow`, after the seek and the clearing.
    Changelog partitions pass straight through."""
    consumer = app.consumer
    if getattr(consumer, "mlpe_held_partitions", None) is not None:
        return
    held: set = set()
    consumer.mlpe_held_partitions = held
    resume_partitions, resume_flow = consumer.resume_partitions, consumer.resume_flow

    def in_client_thread(method: str, tps) -> None:
        client = consumer._thread._ensure_consumer()  # the aiokafka consumer, its thread's
        tps = [TopicPartition(tp.topic, tp.partition) for tp in tps]
        consumer._thread.thread_loop.call_soon_threadsafe(
            lambda: getattr(client, method)(*[tp for tp in tps if tp in client.assignment()]))

    def resume_later(tps) -> None:
        tps = set(tps)
        streams = {tp for tp in tps if tp.topic not in app.tables.changelog_topics}
        if streams:
            held.update(streams)
            in_client_thread("pause", streams)
        if tps - streams:
            resume_partitions(tps - streams)

    def resume_flow_then_partitions() -> None:
        resume_flow()
        ready = held & set(consumer.assignment())
        held.clear()
        if ready:
            resume_partitions(ready)
            in_client_thread("resume", ready)

    consumer.resume_partitions = resume_later
    consumer.resume_flow = resume_flow_then_partitions


YIELD_EVERY = 32  # metric messages (~20 ms of work) between turns of the other tasks


class StreamApp:
    """One worker's Faust app (`.app`), its topics, tables, agents and timers, and the
    in-memory `state` they share. Building it creates the Faust datadir under
    settings.state_dir and reads the InfluxDB token; it connects to nothing."""

    def __init__(self, settings: Settings, state: StreamState | None = None) -> None:
        self.settings = settings
        self.state = StreamState.create(settings.stream_lateness_s) if state is None else state
        self.rules = rules.load(settings.rules_path) if settings.rules_path else []
        self.prices = prices.load(settings.prices_path)
        self.writer = InfluxWriter(settings)
        self.limits = Limits.of(settings)
        self.metrics_consumer: AIOKafkaConsumer | None = None
        self.dead_letter_log = (-1e9, 0)  # (monotonic time of the last line, unlogged since)
        datadir = settings.state_dir / "stream"
        datadir.mkdir(parents=True, exist_ok=True)

        app = self.app = faust.App(
            settings.stream_app_id,
            broker=f"kafka://{settings.kafka_bootstrap}",
            value_serializer="raw",
            store="memory://",
            web_enabled=False,
            consumer_auto_offset_reset=settings.stream_start,
            broker_commit_interval=1.0,
            # Events are held until their windows are written; on shutdown or rebalance do
            # not wait for them: the next owner of the partition replays them from the
            # last commit.
            stream_wait_empty=False,
            # A killed worker's partitions move to the others after this, not after 60 s.
            broker_session_timeout=10.0,
            broker_heartbeat_interval=1.0,
            datadir=str(datadir),
            topic_partitions=GPU_METRICS.partitions,
            # Each table partition lives on its owner only; a restart recovers it from
            # the changelog.
            table_standby_replicas=0,
        )

        # Topics.
        self.alerts_topic = _raw_topic(app, ALERTS.name)
        self.dead_letters = _raw_topic(app, DEAD_LETTER.name)
        self.gpu_seconds = _raw_topic(app, of_app(GPU_SECONDS, settings.stream_app_id).name,
                                      internal=True, partitions=GPU_SECONDS.partitions,
                                      retention=GPU_SECONDS.retention_ms / 1000)
        self.train_topic = _raw_topic(app, TRAIN_EVENTS.name)
        self.kernel_topic = _raw_topic(app, KERNEL_EVENTS.name)
        self.cost_topic = _raw_topic(app, COST_EVENTS.name)

        # Tables: detector state, co-partitioned with the topic that feeds it.
        self.gpu_series = app.Table(  # node/gpu -> baseline and trend state
            "gpu-series", default=dict, partitions=GPU_SECONDS.partitions, schema=TABLE_SCHEMA)
        self.peer_groups = app.Table(  # job -> cross-peer state
            "peer-groups", default=dict, partitions=GPU_SECONDS.partitions, schema=TABLE_SCHEMA)
        self.train_jobs = app.Table(  # job -> training detector state
            "train-jobs", default=dict, partitions=TRAIN_EVENTS.partitions, schema=TABLE_SCHEMA)

        # Agents, timers, the write loop and the rebalance hook. Each body is the method
        # of the same name; for an agent that name now means the Faust agent (whose
        # name, "mlpe.stream.app.<method>", is what Faust logs).
        app.task(self.consume_metrics)
        self.detect_gpus = app.agent(self.gpu_seconds)(self.detect_gpus)
        self.train_steps = app.agent(self.train_topic)(self.train_steps)
        self.kernel_timings = app.agent(self.kernel_topic)(self.kernel_timings)
        self.job_costs = app.agent(self.cost_topic)(self.job_costs)
        app.timer(interval=1.0)(self.watch_stalls)
        app.task(self.write_closed_windows)
        app.task(self.follow_placements)
        app.timer(interval=10.0)(self.log_stats)
        app.on_partitions_revoked.connect(self.forget_revoked)
        app.on_partitions_assigned.connect(self.expect_placements)

    # Agents.

    async def consume_metrics(self) -> None:
        """The metric topics, without Faust: a plain consumer in the group
        "<app id>-metrics" takes them in batches (getmany) and commits by hand, only up
        to the events acknowledged (acks.py). Faust's per-event machinery cost half of
        the CPU of each message, and its recovery raced the fetcher (see
        seek_stream_partitions_before_fetching); a group of its own needs neither."""
        settings = self.settings
        while not self.app.should_stop:
            consumer = self.metrics_consumer = AIOKafkaConsumer(
                bootstrap_servers=settings.kafka_bootstrap,
                group_id=metrics_group(settings.stream_app_id), enable_auto_commit=False,
                auto_offset_reset=settings.stream_start, session_timeout_ms=10_000,
                heartbeat_interval_ms=1_000, fetch_max_wait_ms=50,
                max_partition_fetch_bytes=4 * 2**20)
            consumer.subscribe([GPU_METRICS.name, HOST_METRICS.name],
                               listener=_MetricsRebalance(self))
            try:
                await consumer.start()
                await self.read_metrics(consumer)
            except KafkaError as err:
                log.warning("metrics consumer: %s; again in %g s", err, PLACEMENT_RETRY_S)
            finally:
                await self.commit_metrics(consumer)
                await consumer.stop()
            if not self.app.should_stop:
                await asyncio.sleep(PLACEMENT_RETRY_S)

    async def read_metrics(self, consumer: AIOKafkaConsumer) -> None:
        state, last_commit = self.state, time.monotonic()
        while not self.app.should_stop:
            fetched = await consumer.getmany(timeout_ms=100,
                                             max_records=self.settings.stream_fetch_records)
            if fetched and state.placements_loaded is not None and \
                    not state.placements_loaded.is_set():
                await self.wait_for_placements()
            taken = 0
            for tp, records in fetched.items():
                for record in records:
                    if tp not in consumer.assignment():
                        break  # revoked meanwhile: its new owner reads it from the commit
                    await self.take_metrics(record)
                    taken += 1
                    if taken % YIELD_EVERY == 0:
                        # take_metrics rarely suspends: without this a fetch of 2,000
                        # messages held the event loop for a second, and the write loop
                        # (windows out, events released) waited behind it.
                        await asyncio.sleep(0)
            if time.monotonic() - last_commit >= 1.0:
                await self.commit_metrics(consumer)
                last_commit = time.monotonic()

    async def commit_metrics(self, consumer: AIOKafkaConsumer, only=None) -> None:
        """Commit each owned metric partition up to its last acknowledged event."""
        owned = consumer.assignment()
        offsets = {TopicPartition(*p): offset
                   for p, offset in self.state.committable.items()
                   if TopicPartition(*p) in owned and (only is None or p in only)}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as err:  # a rebalance: replayed, not lost
            log.warning("metrics commit failed (%s); the partitions' next owner replays",
                        err)
            return
        for tp in offsets:
            self.state.committable.pop((tp.topic, tp.partition), None)

    async def take_metrics(self, record) -> Consumed:
        """One metric batch (an aiokafka record) into windows, and its events and rule
        breaches as alerts. Whatever goes wrong with one message sends it to the
        dead-letter topic with the reason; the others go on."""
        state = self.state
        event = Consumed(record, state.committable)
        partition = (record.topic, record.partition)
        state.last_offsets[partition] = record.offset
        try:
            batch = parse_batch(record.value or b"", self.limits)
        except ClockError as err:
            await self.refuse(record, str(err))
            await self.clock_ahead(err)
            state.ack_queues.ack_in_order(event)
            return event
        except batches.BatchError as err:
            await self.refuse(record, str(err))
            state.ack_queues.ack_in_order(event)
            return event
        held: list = []
        try:
            await self.aggregate(record, batch, event, held)
        except Exception as err:  # noqa: BLE001 - one bad message must not stop the rest
            await self.failed(record, err)
            if held:
                held[0].ack_if_unheld()
            else:
                state.ack_queues.ack_in_order(event)
        return event

    async def aggregate(self, record, batch: batches.NodeBatch, event: Consumed,
                        held: list) -> None:
        """A checked batch (of `record`) into windows and alerts; the hold on its event,
        once made, goes into `held`."""
        state, partition = self.state, (record.topic, record.partition)
        if batch.node_id in state.clock_ahead:
            await self.clock_ahead(None, batch.node_id)
        fresh = state.seqs.fresh(batch)
        if not fresh.all():
            state.counters["duplicate_batches"] += int((~fresh).sum())
            if not fresh.any():
                state.ack_queues.ack_in_order(event)
                return
            batch = batch.select(fresh)
        batch.jobs = state.placements.jobs_of(batch)  # what windows and reports carry
        found = rules.evaluate(self.rules, state.rule_states, batch)
        now_ns = time.time_ns()
        for d, device_events in enumerate(batch.events):
            if device_events:
                found += events_detector.detect(batch.device(d), now_ns, state.throttle_masks)
        if found:
            await self.publish(found)
        hold = state.ack_queues.hold(event)
        held.append(hold)
        late = []
        for windows in state.windows:
            hold.refs += windows.add(partition, batch, hold)
            if windows.last_late:
                late.append((windows.label, windows.last_late))
        if late:
            await self.report_late(record, batch, late, dropped=hold.refs == 0)
        state.counters["batches"] += 1
        state.arrival_delays.append(
            time.time() - batch.timestamps_ns[-1] / 1e9 if batch.samples else 0)
        state.counters["values"] += batch.values
        hold.ack_if_unheld()  # acked now if its windows were all written already

    async def report_late(self, message, batch: batches.NodeBatch,
                          late: list[tuple[str, int]], dropped: bool) -> None:
        """Samples that came after their window was written are left out of it, never
        silently: counted per node, written to InfluxDB (measurement stream_dropped, per
        window width), and a batch that no window took goes to the dead-letter topic."""
        state = self.state
        node = escape_tag(batch.node_id)
        now_ns = time.time_ns()
        for label, samples in late:
            state.annotations.append(f"stream_dropped,node={node},reason=late,window={label} "
                                     f"samples={samples * batch.devices}i {now_ns}")
        state.late_by_node[batch.node_id] = \
            state.late_by_node.get(batch.node_id, 0) + max(n for _, n in late)
        if dropped:
            state.counters["late_batches"] += 1
            await self.refuse(message, f"late: every sample of node {batch.node_id} came "
                              "after its windows were written (more than "
                              f"{self.settings.stream_lateness_s:g} s behind the node's "
                              "newest data, MLPE_STREAM_LATENESS_S)")

    async def clock_ahead(self, err: ClockError | None, node: str = "") -> None:
        """A node's clock ahead of this worker's: one alert naming the node, resolved by
        its next batch in time."""
        now_ns = time.time_ns()
        node = err.node if err is not None else node
        firing = err is not None
        if firing == (node in self.state.clock_ahead):
            return
        (self.state.clock_ahead.add if firing else self.state.clock_ahead.discard)(node)
        summary = (f"Clock of {node} is {err.ahead_s:.0f} s ahead; its data is refused"
                   if firing else f"Clock of {node} is in time again")
        await self.publish([alerts_pb2.Alert(
            fingerprint=fingerprint("node_clock_ahead", node), rule="node_clock_ahead",
            detector="stream", severity=alerts_pb2.SEVERITY_WARNING,
            state=alerts_pb2.ALERT_FIRING if firing else alerts_pb2.ALERT_RESOLVED,
            labels={"node": node}, value=err.ahead_s if firing else 0.0,
            threshold=self.limits.clock_tolerance_s, starts_at_ns=now_ns,
            ends_at_ns=0 if firing else now_ns, detected_at_ns=now_ns, summary=summary,
            explanation=("Its batches are stamped later than this worker's clock allows "
                         "(MLPE_STREAM_CLOCK_TOLERANCE_S) and go to mlpe.deadletter: "
                         "accepted, they would close windows early. Check NTP on the node."
                         if firing else "Its batches are accepted again."))])

    async def detect_gpus(self, stream) -> None:
        """Baseline, trend and cross-peer detectors over each GPU's 1 s means."""
        async for event in stream.events():
            try:
                await self.detect_report(event)
            except Exception as err:  # noqa: BLE001 - one bad message must not stop the agent
                await self.failed(event.message, err)

    async def detect_report(self, event) -> None:
        try:
            report = parse_report(event.value)
        except ValueError as err:
            await self.dead_letter(event, str(err))
            return
        now_ns, node, start, found = time.time_ns(), report["node"], report["start_ns"], []
        partition = (event.message.topic, event.message.partition)
        for gpu, values in report["gpus"].items():
            values = {k: (math.nan if v is None else float(v)) for k, v in values.items()}
            member = f"{node}/{gpu}"
            series = self.series_state(member)
            if start <= series.get("t", 0):
                continue  # replayed after a crash: already learned
            stat_state, stat_alerts = baseline.step(series.get("baseline"), node, gpu,
                                                    start, values, now_ns)
            trend_state, trend_alerts = trend.step(
                series.get("trend"), node, gpu, start, values.get("mem_used", math.nan),
                values.get("mem_total", math.nan), now_ns)
            self.save_series_state(member, {"t": start, "baseline": stat_state,
                                            "trend": trend_state}, now_ns,
                                   at_once=bool(stat_alerts or trend_alerts),
                                   partition=partition)
            found += stat_alerts + trend_alerts
        job = report["job"]
        buckets = self.state.peer_buckets.setdefault(job, peers.Buckets())
        buckets.add(report)
        group = self.peer_groups[job]
        ready = buckets.ready(group.get("last_start", 0))
        for second, members in ready:
            group, peer_alerts = peers.evaluate(group, second, members, now_ns)
            found += peer_alerts
        if ready:
            self.peer_groups[job] = group
        await self.publish(found)

    def series_state(self, member: str) -> dict:
        """A GPU's baseline and trend state: the newest, in memory, else its table's."""
        cached = self.state.series_states.get(member)
        return cached if cached is not None else self.gpu_series[member]

    def save_series_state(self, member: str, series: dict, now_ns: int, at_once: bool,
                          partition: Partition) -> None:
        """Keep the newest in memory; write it to the table at most every
        SERIES_SAVE_S per GPU, and at once when it alerted. Written every second, its
        JSON changelog record was half of this agent's CPU. A crash loses at most that
        much learning (the reports are committed as they are read)."""
        state = self.state
        state.series_states[member] = series
        state.series_partitions[member] = partition
        if at_once or now_ns - state.series_saved_ns.get(member, 0) >= SERIES_SAVE_S * 1e9:
            self.gpu_series[member] = series
            state.series_saved_ns[member] = now_ns

    async def train_steps(self, stream) -> None:
        """Training aggregates per job and rank, and the training detectors."""
        async for event in stream.noack().events():
            held: list = []
            try:
                await self.take_step(event, held)
            except Exception as err:  # noqa: BLE001 - one bad message must not stop the agent
                await self.failed(event.message, err)
                if held:
                    held[0].ack_if_unheld()
                else:
                    self.state.ack_queues.ack_in_order(event)

    async def take_step(self, event, held: list) -> None:
        """One TrainStep event; the hold on it, once made, goes into `held`."""
        state = self.state
        try:
            msg = parse_step(event.value, self.limits)
        except ValueError as err:
            await self.dead_letter(event, str(err))
            state.ack_queues.ack_in_order(event)
            return
        now_ns = time.time_ns()
        partition = (event.message.topic, event.message.partition)
        if msg.halt:  # not a step: the job stopped on purpose, its silence is no stall
            job_state = training.halt(self.job_state(msg.job_id), msg)
            if job_state is not None:
                self.save_job_state(msg.job_id, job_state, now_ns, at_once=True,
                                    partition=partition)
            if job_state is not None and msg.job_id in state.stalled_jobs:
                state.stalled_jobs.discard(msg.job_id)
                await self.publish([training.stall_alert(msg.job_id, job_state, now_ns,
                                                         stalled=True)])
            state.ack_queues.ack_in_order(event)
            return
        job_state, found = training.step(self.job_state(msg.job_id), msg, now_ns)
        self.save_job_state(msg.job_id, job_state, now_ns, at_once=bool(found),
                            partition=partition)
        if msg.job_id in state.stalled_jobs:
            resolved = training.stall_alert(msg.job_id, job_state, now_ns, stalled=True)
            if resolved is not None:
                state.stalled_jobs.discard(msg.job_id)
                found.append(resolved)
        await self.publish(found)
        state.last_offsets[partition] = event.message.offset
        hold = state.ack_queues.hold(event)
        held.append(hold)
        for windows in state.windows:
            hold.refs += windows.add(partition, StepRow(msg), hold)
        state.counters["steps"] += 1
        hold.ack_if_unheld()

    def job_state(self, job: str) -> dict | None:
        """A job's training-detector state: the newest, in memory, else its table's."""
        cached = self.state.job_states.get(job)
        return cached if cached is not None else (self.train_jobs[job] or None)

    def save_job_state(self, job: str, job_state: dict, now_ns: int, at_once: bool,
                       partition: Partition) -> None:
        """Keep the newest in memory; write it to the table (one changelog record with
        every rank in it) at most once a second per job, and at once when it alerted
        or halted. Every rank's step rewrote it: a 512-rank job made 1,000 records a
        second. A restart loses at most that second, and replays it: training events are
        committed only once their 10 s windows are written, and a step seen twice is
        ignored (detectors/training.py)."""
        self.state.job_states[job] = job_state
        self.state.job_partitions[job] = partition
        last = self.state.job_saved_ns.get(job, 0)
        if at_once or now_ns - last >= 10**9:
            self.train_jobs[job] = job_state
            self.state.job_saved_ns[job] = now_ns

    async def kernel_timings(self, stream) -> None:
        """KernelSummary events into the `kernel` measurement (kernels.py)."""
        await self.write_events(stream, kernel_lines, "kernel_summaries")

    async def job_costs(self, stream) -> None:
        """JobCost events from `mlpe control` into the `cost` measurement (costs.py)."""
        await self.write_events(stream, lambda raw: [cost_line(raw)], "job_costs")

    async def write_events(self, stream, to_lines, counter: str) -> None:
        """Each event as the points `to_lines` makes of it, written before the event is
        acknowledged (a replay rewrites the same points); one `to_lines` refuses (its
        ValueError) goes to the dead-letter topic."""
        async for event in stream.events():
            try:
                try:
                    lines = to_lines(event.value)
                except ValueError as err:
                    await self.dead_letter(event, str(err))
                    continue
                await self.writer.write(lines)
                self.state.counters[counter] = self.state.counters.get(counter, 0) + 1
            except Exception as err:  # noqa: BLE001 - one bad message must not stop the agent
                await self.failed(event.message, err)

    # Timers and tasks.

    async def watch_stalls(self) -> None:
        """A stall is the absence of steps, so it is noticed by the clock, not by an event;
        never while this worker still has steps to read (it would only be behind)."""
        owned = [tp for tp in self.app.consumer.assignment() if tp.topic == TRAIN_EVENTS.name]
        if any(self.backlog((tp.topic, tp.partition)) for tp in owned):
            return
        await self.publish(self.new_stalls(time.time_ns()))

    def new_stalls(self, now_ns: int) -> list[alerts_pb2.Alert]:
        """Firing stall alerts for the jobs that went quiet since the last look."""
        stalled, found = self.state.stalled_jobs, []
        for job, job_state in {**dict(self.train_jobs.items()),
                               **self.state.job_states}.items():
            if job_state and job not in stalled:
                alert = training.stall_alert(job, job_state, now_ns, stalled=False)
                if alert is not None:
                    stalled.add(job)
                    found.append(alert)
        return found

    async def write_closed_windows(self) -> None:
        """Every 100 ms, write the windows that closed and release their events."""
        while not self.app.should_stop:
            await asyncio.sleep(0.1)
            try:
                await self.write_once()
            except NotReady:
                # Faust stops its producer before this task: a pass caught in between
                # crashed the worker on SIGTERM. Its windows' events are not acknowledged,
                # so the next start writes them again.
                if not self.app.should_stop:
                    raise

    async def write_once(self) -> None:
        """One pass of the write loop: windows out, then their events released."""
        state = self.state
        closed = state.minutes.roll([c for windows in state.windows
                                     for c in windows.close_ready(backlog=self.backlog)],
                                    backlog=self.backlog)
        notes, state.annotations[:] = list(state.annotations), []
        if not closed and not notes:
            return
        for job, report in gpu_second_reports(closed):  # detectors first: they are the hurry
            await self.gpu_seconds.send(key=job.encode(), value=json.dumps(report).encode())
        lines = [line for c in closed for line in c.lines]
        lines += gpu_cost_lines(closed, state.gpu_types, self.prices, self.settings.pricing,
                                self.settings.idle_util_pct)
        await self.writer.write(lines + notes)  # retries until written
        state.counters["windows_written"] += len(lines)
        now_ns = time.time_ns()
        state.close_delays.extend((now_ns - c.end_ns) / 1e9 for c in closed
                                  if c.lines and c.end_ns - c.start_ns == 10**9)
        for window in closed:
            for hold in window.tokens:
                hold.release()

    async def follow_placements(self) -> None:
        """Read all of mlpe.placement into state.placements: from its start, then as it
        grows; a broken session starts over. A plain consumer without a group: it gets
        every partition of the topic (a node's GPU batches may go to any worker, so every
        worker needs every placement; a group would split them between workers) and
        commits nothing (the topic is small and compacted: a restart reads it again).
        Not a Faust GlobalTable: that takes the topic for its own changelog (Faust's
        serialization, written to on every change) and makes the worker's start wait on
        its recovery."""
        state = self.state
        if state.placements_loaded is None:
            state.placements_loaded = asyncio.Event()
        while not self.app.should_stop:
            try:
                await self.read_placements(state.placements_loaded)
            except KafkaError as err:
                log.warning("reading %s: %s; again in %g s", PLACEMENT.name, err,
                            PLACEMENT_RETRY_S)
            await asyncio.sleep(PLACEMENT_RETRY_S)

    async def read_placements(self, loaded: asyncio.Event) -> None:
        """One consumer session over mlpe.placement and mlpe.inventory (the GPU models the
        fleet's gpu_cost points are priced by); sets `loaded` once at their end."""
        consumer = AIOKafkaConsumer(PLACEMENT.name, INVENTORY.name,
                                    bootstrap_servers=self.settings.kafka_bootstrap,
                                    group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            while not self.app.should_stop:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        if record.topic == INVENTORY.name:
                            await self.take_inventory(record)
                        else:
                            await self.take_placement(record)
                if not loaded.is_set() and await self.read_to_end(consumer):
                    log.info("%s read: %d nodes with placed pids", PLACEMENT.name,
                             len(self.state.placements.pids))
                    loaded.set()
        finally:
            await consumer.stop()

    @staticmethod
    async def read_to_end(consumer: AIOKafkaConsumer) -> bool:
        parts = list(consumer.assignment())
        if not parts:
            return False
        ends = await consumer.end_offsets(parts)
        return all([await consumer.position(tp) >= ends[tp] for tp in parts])

    async def take_placement(self, record) -> None:
        """One record of mlpe.placement (an aiokafka ConsumerRecord) into the join."""
        if record.value is None:  # a tombstone: "<node id>/<job id>" is gone
            node, _, job = (record.key or b"").decode(errors="replace").partition("/")
            self.state.placements.forget(node, job)
            return
        try:
            placement = parse_placement(record.key, record.value)
        except ValueError as err:
            await self.refuse(record, str(err))
            return
        self.state.placements.apply(placement)
        self.state.counters["placements"] += 1

    async def take_inventory(self, record) -> None:
        """One record of mlpe.inventory: the node's GPU types, for gpu_cost."""
        node = (record.key or b"").decode(errors="replace")
        if record.value is None:  # a tombstone: the node is gone
            self.state.gpu_types.pop(node, None)
            return
        try:
            inventory = parse_inventory(record.value, self.limits)
        except ValueError as err:
            await self.refuse(record, str(err))
            return
        self.state.gpu_types[inventory.node_id] = inventory_types(inventory)

    async def expect_placements(self, app, assigned, **kwargs) -> None:
        """Sent before the new partitions' records are fetched: from now on `aggregate`
        waits for the placements (follow_placements may start a little later)."""
        if self.state.placements_loaded is None:
            self.state.placements_loaded = asyncio.Event()
        seek_stream_partitions_before_fetching(app)

    async def wait_for_placements(self) -> None:
        """Until mlpe.placement is read once: a batch judged before would lose its job
        (and a window replayed after a restart would be written without its job tag)."""
        loaded = self.state.placements_loaded
        try:
            await asyncio.wait_for(loaded.wait(), PLACEMENT_WAIT_S)
        except TimeoutError:
            log.warning("%s not read after %g s; going on without it for now",
                        PLACEMENT.name, PLACEMENT_WAIT_S)
            loaded.set()

    def backlog(self, partition: Partition) -> bool:
        """Is there unread data on this partition? (Then silence is only us being busy.)"""
        try:
            if partition[0] in (GPU_METRICS.name, HOST_METRICS.name):
                highwater = self.metrics_consumer.highwater(TopicPartition(*partition))
            else:
                highwater = self.app.consumer.highwater(TP(*partition))
        except Exception:  # noqa: BLE001 - not assigned or not known yet: assume busy
            return True
        return highwater is None or self.state.last_offsets.get(partition, -1) + 1 < highwater

    async def forget_revoked(self, app, revoked, **kwargs) -> None:
        """Open windows of partitions we no longer own are dropped unwritten (never a
        partial window): their new owner replays those events from the last commit."""
        partitions = {(tp.topic, tp.partition) for tp in revoked}
        for windows in self.state.windows:
            windows.drop_partitions(partitions)
        self.state.minutes.drop_partitions(partitions)
        self.state.ack_queues.drop(partitions)
        state = self.state
        for job in [j for j, p in state.job_partitions.items() if p in partitions]:
            for table in (state.job_states, state.job_partitions, state.job_saved_ns):
                table.pop(job, None)
        for member in [m for m, p in state.series_partitions.items() if p in partitions]:
            for table in (state.series_states, state.series_partitions,
                          state.series_saved_ns):
                table.pop(member, None)

    async def log_stats(self) -> None:
        """Every 10 s, the counters and the delay percentiles, to the log."""
        state = self.state
        late = sum(w.late_samples for w in state.windows)
        duplicates = sum(w.duplicate_samples for w in state.windows)
        delays = np.array(state.close_delays) if state.close_delays else np.zeros(1)
        arrivals = np.array(state.arrival_delays) if state.arrival_delays else np.zeros(1)
        log.info("stream stats: %s late_samples=%d duplicate_samples=%d "
                 "window_written_after_end_p50=%.2fs p99=%.2fs batch_arrival_p50=%.2fs "
                 "p99=%.2fs", state.counters, late, duplicates, np.percentile(delays, 50),
                 np.percentile(delays, 99), np.percentile(arrivals, 50),
                 np.percentile(arrivals, 99))

    # Output.

    async def publish(self, alerts: list[alerts_pb2.Alert]) -> None:
        """To mlpe.alerts for the notifier, and to InfluxDB with the next windows for
        Grafana."""
        for alert in alerts:
            await self.alerts_topic.send(key=alert.fingerprint.encode(),
                                         value=alert.SerializeToString())
            self.state.annotations.append(alert_line(alert))
            self.state.counters["alerts"] += 1

    async def failed(self, message, err: Exception) -> None:
        """A message whose handling raised: to the dead-letter topic, with the error."""
        log.exception("%s/%d offset %d could not be processed", message.topic,
                      message.partition, message.offset)
        await self.refuse(message, f"could not be processed: {type(err).__name__}: "
                          f"{str(err)[:500]}")

    async def dead_letter(self, event, reason: str) -> None:
        await self.refuse(event.message, reason)

    async def refuse(self, message, reason: str) -> None:
        """`message` (a Faust message or an aiokafka record: topic, partition, offset,
        key, value) to the dead-letter topic with the reason."""
        refused_at = Timestamp()
        refused_at.GetCurrentTime()
        letter = deadletter_pb2.DeadLetter(
            source_topic=message.topic, source_partition=message.partition,
            source_offset=message.offset, key=message.key or b"", value=message.value or b"",
            reason=reason, refused_by="stream", refused_at=refused_at)
        await self.dead_letters.send(key=message.topic.encode(), value=letter.SerializeToString())
        self.state.counters["dead_letters"] += 1
        # A flood of bad messages must not become a flood of log lines: one a second,
        # saying how many went unlogged (all are on the dead-letter topic).
        now, (last, unlogged) = time.monotonic(), self.dead_letter_log
        if now - last < 1.0:
            self.dead_letter_log = (last, unlogged + 1)
            return
        self.dead_letter_log = (now, 0)
        log.warning("dead letter: %s (topic %s, partition %d, offset %d)%s", reason,
                    message.topic, message.partition, message.offset,
                    f"; {unlogged} more since the last line" if unlogged else "")


class _MetricsRebalance(ConsumerRebalanceListener):
    """The metrics consumer's partitions move: commit what is written, forget the rest
    (open windows and held events of partitions no longer ours; their next owner
    replays them from the commit)."""

    def __init__(self, stream: StreamApp) -> None:
        self.stream = stream

    async def on_partitions_revoked(self, revoked) -> None:
        partitions = {(tp.topic, tp.partition) for tp in revoked}
        consumer = self.stream.metrics_consumer
        if consumer is not None:
            await self.stream.commit_metrics(consumer, only=partitions)
        await self.stream.forget_revoked(None, revoked)
        for partition in partitions:
            self.stream.state.committable.pop(partition, None)

    async def on_partitions_assigned(self, assigned) -> None:
        state = self.stream.state
        if assigned and state.placements_loaded is None:  # batches wait for placements
            state.placements_loaded = asyncio.Event()
