"""The stream's detector agents in Faust's in-memory test context (no Kafka): events go
in through agent.put, table state and alerts are what the agents leave behind."""

import dataclasses
import json
import logging
import math
import re
import time

import numpy as np
import pytest
from aiokafka import TopicPartition
from sim_seconds import scenario, seconds

from mlpe.common import batches
from mlpe.common.settings import load
from mlpe.common.topics import GPU_METRICS
from mlpe.stream.app import StreamApp, _MetricsRebalance
from mlpe.stream.decoding import SECOND_FIELDS
from mlpe.stream.detectors import training
from mlpe.v1 import alerts_pb2 as al
from mlpe.v1 import metrics_pb2 as pb
from mlpe.v1.training_pb2 import TrainStep
from tests.helpers import kafka_record


@pytest.fixture()
def stream(tmp_path) -> StreamApp:
    """A fresh app and state per test, configured by its own mapping (no environment)."""
    return StreamApp(load({"MLPE_STATE_DIR": str(tmp_path / "state"),
                           "MLPE_INFLUX_TOKEN": "unit-test-token", "MLPE_RULES": ""}))


@pytest.fixture()
def alerts(stream, monkeypatch):
    """What the agents publish (the Kafka send is the one thing replaced)."""
    out: list[al.Alert] = []

    async def send(key, value):
        out.append(al.Alert.FromString(value))

    monkeypatch.setattr(stream.alerts_topic, "send", send)
    stream.app.finalize()
    stream.app.flow_control.resume()
    return out


def reports(s, duration_s: int, job: str = "job-a"):
    for start, nodes in seconds(s, duration_s):
        for node, gpus in nodes.items():
            yield json.dumps({"job": job, "node": node, "start_ns": start, "gpus": {
                gpu: {k: (v if math.isfinite(v) else None) for k, v in values.items()
                      if k in SECOND_FIELDS} for gpu, values in gpus.items()}}).encode()


async def test_detect_gpus_finds_a_straggler_and_keeps_state_in_tables(stream, alerts):
    async with stream.detect_gpus.test_context() as agent:
        for raw in reports(scenario(("straggler", 1, 4, 20, 15)), 40):
            await agent.put(raw)
    firing = [a for a in alerts if a.state == al.ALERT_FIRING]
    assert [(a.rule, a.labels["node"], a.labels["gpu"]) for a in firing] == [
        ("peer_low_sm_clock", "sim-node-01", "4")]
    assert "below its peers" in firing[0].summary and firing[0].detector == "peer"
    assert stream.peer_groups["job-a"]["last_start"] > 0
    assert stream.series_state("sim-node-01/4")["baseline"]["busy_s"] > 20
    # The table (its changelog) is written at a GPU's first report, then every 10 s of
    # the worker's clock, not every second: this test took less than that.
    assert stream.gpu_series["sim-node-01/4"]["t"] < stream.series_state("sim-node-01/4")["t"]
    assert stream.gpu_series["sim-node-01/4"]["baseline"]["busy_s"] <= 1


async def test_detect_gpus_dead_letters_a_bad_report_and_goes_on(stream, alerts,
                                                                  monkeypatch):
    refused = []

    async def dead_letter(event, reason):
        refused.append(reason)

    monkeypatch.setattr(stream, "dead_letter", dead_letter)
    async with stream.detect_gpus.test_context() as agent:
        await agent.put(b"{not json")
        await agent.put(json.dumps({"node": "", "start_ns": 1, "gpus": {}}).encode())
        for raw in reports(scenario(("link_degradation", 0, 1, 12, 10)), 20):
            await agent.put(raw)
    assert len(refused) == 2 and "not a GPU-seconds report" in refused[0]
    assert any(a.rule == "peer_low_nvlink_tx" for a in alerts)


HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def step(n: int, rank: int, loss: float = 2.0) -> bytes:
    return TrainStep(job_id="job-t", rank=rank, world_size=2, step=n,
                     time_ns=HOUR_AGO_NS + n * 500_000_000, loss=loss,
                     tokens_per_s=32768.0, step_time_s=0.5).SerializeToString()


async def test_train_steps_nan_loss_alert_and_job_state(stream, alerts):
    stream.state.windows = []  # windows are tested elsewhere
    async with stream.train_steps.test_context() as agent:
        for n in range(1, 51):
            for rank in (0, 1):
                await agent.put(step(n, rank, math.nan if n == 25 else 2.0))
    assert [(a.rule, a.state) for a in alerts] == [
        ("training_loss_nonfinite", al.ALERT_FIRING), ("training_loss_nonfinite",
                                                       al.ALERT_RESOLVED)]
    state = stream.job_state("job-t")
    assert state["steps"] == 50 and state["ranks"] == {"0": 50, "1": 50}


async def test_a_completed_job_is_not_reported_stalled(stream, alerts):
    stream.state.windows = []
    async with stream.train_steps.test_context() as agent:
        for n in range(1, 31):
            for rank in (0, 1):
                await agent.put(step(n, rank))
        for rank in (0, 1):  # each rank's last message: it halted, no step follows
            await agent.put(TrainStep(job_id="job-t", rank=rank, world_size=2, step=30,
                                      time_ns=HOUR_AGO_NS + 31 * 500_000_000,
                                      halt="completed").SerializeToString())
    assert stream.job_state("job-t")["halt"][0] == "completed"
    assert stream.new_stalls(time.time_ns()) == []  # an hour of silence, but it halted
    assert alerts == []
    stream.state.job_states["job-t"] = {**stream.job_state("job-t"), "halt": None}
    assert [a.rule for a in stream.new_stalls(time.time_ns())] == ["training_stalled"]


def metrics(value: bytes, offset: int):
    return kafka_record(GPU_METRICS.name, value, offset=offset, key=b"n1")


def gpu_batch(second: float, seq: int, events=()) -> bytes:
    """100 ms of 100 Hz samples of GPU 0 of node n1, `second` s into a 10 s window."""
    start_ns = HOUR_AGO_NS // 10**10 * 10**10 + int(second * 10**9)
    times = start_ns + np.arange(10, dtype=np.int64) * 10_000_000
    return batches.encode(batches.Batch("n1", pb.DEVICE_KIND_GPU, 0, "", 1, seq, seq * 10,
                                        times, {pb.GPU_UTIL: np.full(10, 90.0)},
                                        events=list(events), job_id="job-g"))


async def test_aggregate_alerts_at_once_and_acks_only_written_data(stream, alerts,
                                                                    monkeypatch, caplog):
    written: list[str] = []
    seconds_sent: list[dict] = []

    async def write(lines):
        written.extend(lines)

    async def send_second(key, value):
        seconds_sent.append(json.loads(value))

    async def send_letter(key, value):
        letters.append(value)

    letters: list[bytes] = []
    monkeypatch.setattr(stream.writer, "write", write)
    monkeypatch.setattr(stream.gpu_seconds, "send", send_second)
    monkeypatch.setattr(stream.dead_letters, "send", send_letter)  # no Kafka in unit tests
    xid = pb.DeviceEvent(kind=pb.EVENT_XID, code=79, time_ns=HOUR_AGO_NS)
    first = await stream.take_metrics(metrics(gpu_batch(0.0, 0, [xid]), 0))
    garbage = await stream.take_metrics(metrics(b"\x08\x96\x01 not a batch", 1))
    later = await stream.take_metrics(metrics(gpu_batch(1.5, 1), 2))  # closes 1 s window 0
    assert [a.rule for a in alerts] == ["gpu_xid"]  # at once, before any window is written
    assert stream.state.counters["dead_letters"] == 1 and stream.state.counters["batches"] == 2
    assert len(letters) == 1
    assert not first.acked and not garbage.acked  # held behind `first`
    assert stream.state.committable == {}
    await stream.write_once()
    assert [line.split(" ")[0] for line in written] == [
        "gpu,node=n1,window=1s,gpu=0,job=job-g", "alert,rule=gpu_xid,severity=SEVERITY_CRITICAL,"
        "gpu=0,node=n1"]
    assert [(s["node"], list(s["gpus"])) for s in seconds_sent] == [("n1", ["0"])]
    assert not first.acked  # its 10 s window is still open
    for windows in stream.state.windows:
        for window in windows.close_ready(flush_all=True):
            for hold in window.tokens:
                hold.release()
    assert first.acked and garbage.acked and later.acked
    assert stream.state.committable == {(GPU_METRICS.name, 0): 3}  # what the next commit says
    caplog.set_level(logging.INFO, "mlpe.stream")
    await stream.log_stats()  # test_stream.py reads the batches count from this line
    assert re.search(r"stream stats: \{'batches': 2, ", caplog.text)


async def test_a_revoked_partition_loses_its_open_windows_and_held_events(stream, alerts):
    held = await stream.take_metrics(metrics(gpu_batch(0.0, 0), 0))
    partition = (held.message.topic, held.message.partition)
    assert partition in stream.state.ack_queues.queues
    await _MetricsRebalance(stream).on_partitions_revoked({TopicPartition(*partition)})
    assert stream.state.ack_queues.queues == {}
    assert all(w.open == {} and w.watermark == {} for w in stream.state.windows)
    assert not held.acked  # the partition's next owner replays it


@pytest.fixture()
def refused(stream, monkeypatch):
    """(offset, reason) of every message the app sends to the dead-letter topic."""
    out: list[tuple[int, str]] = []

    async def refuse(message, reason):
        out.append((message.offset, reason))

    monkeypatch.setattr(stream, "refuse", refuse)
    return out


def node_batch(second: float, seq: int, node: str = "n1", epoch: int = 1,
               ahead_s: float = 0.0) -> bytes:
    """100 ms of 4 GPUs of `node`; stamped `ahead_s` later than `second` says."""
    start_ns = HOUR_AGO_NS // 10**10 * 10**10 + int((second + ahead_s) * 10**9)
    times = start_ns + np.arange(10, dtype=np.int64) * 10_000_000
    return batches.encode(batches.join([
        batches.Batch(node, pb.DEVICE_KIND_GPU, g, "", epoch, seq, seq * 10, times,
                      {pb.GPU_UTIL: np.full(10, 90.0)}) for g in range(4)]))


async def test_a_repeated_batch_is_dropped_by_its_seq(stream, alerts, refused):
    events = [await stream.take_metrics(metrics(node_batch(0.1 * i, i), i)) for i in range(5)]
    again = await stream.take_metrics(metrics(node_batch(0.1, 1), 5))  # a spool replayed twice
    other_epoch = await stream.take_metrics(metrics(node_batch(0.5, 1, epoch=2), 6))
    assert stream.state.counters["duplicate_batches"] == 4  # 4 devices of one batch
    assert again.acked is False and stream.state.counters["batches"] == 6
    for windows in stream.state.windows:
        (closed,) = windows.close_ready(flush_all=True)
        assert {re.search(r",samples=(\d+)i ", line)[1] for line in closed.lines} == {"60"}
        for hold in closed.tokens:
            hold.release()
    assert all(e.acked for e in [*events, again, other_epoch]) and refused == []


async def test_a_node_whose_clock_runs_ahead_is_refused_alerted_and_forgiven(
        stream, alerts, refused):
    stream.limits = dataclasses.replace(stream.limits, clock_tolerance_s=10.0)
    ahead = await stream.take_metrics(metrics(node_batch(0, 0, ahead_s=3600 + 1000), 0))
    await stream.take_metrics(metrics(node_batch(0, 1, ahead_s=3600 + 1000), 1))
    assert [offset for offset, _ in refused] == [0, 1] and ahead.acked
    assert re.search(r"n1's samples are \d+\.\d s ahead .* its clock is off", refused[0][1])
    assert [(a.rule, a.state, dict(a.labels)) for a in alerts] == [
        ("node_clock_ahead", al.ALERT_FIRING, {"node": "n1"})]  # once, not per batch
    await stream.take_metrics(metrics(node_batch(0.2, 2), 2))  # its clock is right again
    assert [a.state for a in alerts] == [al.ALERT_FIRING, al.ALERT_RESOLVED]
    assert stream.state.counters["batches"] == 1


async def test_samples_after_their_window_was_written_are_reported(stream, alerts,
                                                                   refused, monkeypatch):
    async def write(lines):
        written.extend(lines)

    async def send(key, value):
        pass

    written: list[str] = []
    monkeypatch.setattr(stream.writer, "write", write)
    monkeypatch.setattr(stream.gpu_seconds, "send", send)
    for i in range(25):
        await stream.take_metrics(metrics(node_batch(0.1 * i, i), i))
    await stream.write_once()  # the first 1 s window is written, the 10 s one still open
    late = await stream.take_metrics(metrics(node_batch(0.35, 99), 25))
    await stream.write_once()
    assert not late.acked and refused == []  # its 10 s window holds it
    assert stream.state.late_by_node == {"n1": 10}
    assert any(line.startswith("stream_dropped,node=n1,reason=late,window=1s samples=40i")
               for line in written)
    stream.state.windows = stream.state.windows[:1]  # only 1 s windows: nothing takes it
    dropped = await stream.take_metrics(metrics(node_batch(0.45, 100), 26))
    assert [offset for offset, _ in refused] == [26] and stream.state.late_by_node["n1"] == 20
    assert refused[0][1].startswith("late: every sample of node n1 came after its windows")
    assert stream.state.counters["late_batches"] == 1 and dropped.message.offset == 26


async def test_a_message_whose_handling_raises_is_dead_lettered_and_the_rest_go_on(
        stream, alerts, refused, monkeypatch):
    calls = []

    def evaluate(rules, states, batch):
        calls.append(batch.node_id)
        if batch.node_id == "bad":
            raise ZeroDivisionError("division by zero")
        return []

    monkeypatch.setattr("mlpe.stream.rules.evaluate", evaluate)  # an error path on purpose
    bad = await stream.take_metrics(metrics(node_batch(0, 0, node="bad"), 0))
    good = await stream.take_metrics(metrics(node_batch(0, 0, node="good"), 1))
    assert calls == ["bad", "good"] and bad.acked and not good.acked  # good is in a window
    assert refused == [(0, "could not be processed: ZeroDivisionError: division by zero")]
    assert stream.state.counters["batches"] == 1


async def test_a_step_whose_handling_raises_is_dead_lettered_and_the_agent_goes_on(
        stream, alerts, refused, monkeypatch):
    real_step = training.step

    def step_or_fail(state, msg, now_ns):
        if msg.step == 2:
            raise KeyError("boom")
        return real_step(state, msg, now_ns)

    monkeypatch.setattr(training, "step", step_or_fail)  # an error path on purpose
    stream.state.windows = []
    async with stream.train_steps.test_context() as agent:
        for n in (1, 2, 3):
            await agent.put(step(n, 0))
    assert [reason for _, reason in refused] == ["could not be processed: KeyError: 'boom'"]
    assert stream.job_state("job-t")["steps"] == 3  # the step after the failure counted


async def test_a_producer_stopped_under_the_write_loop_ends_it_only_when_stopping(
        stream, monkeypatch):
    """Faust stops its producer before the write loop on SIGTERM: a pass caught in
    between raised NotReady and crashed the worker. While stopping it ends the loop (the
    windows' events are unacknowledged: the next start writes them); otherwise it stays
    an error."""
    from faust.exceptions import NotReady

    async def stopped_mid_pass():
        stream.app._stopped.set()  # what Service.stop() does first
        raise NotReady("Producer service not yet started")

    monkeypatch.setattr(stream, "write_once", stopped_mid_pass)
    await stream.write_closed_windows()  # returns instead of raising

    async def not_stopping():
        raise NotReady("Producer service not yet started")

    stream.app._stopped.clear()
    monkeypatch.setattr(stream, "write_once", not_stopping)
    with pytest.raises(NotReady):
        await stream.write_closed_windows()
