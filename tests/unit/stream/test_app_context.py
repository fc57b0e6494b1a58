"""The stream's detector agents in Faust's in-memory test context (no Kafka): events go
in through agent.put, table state and alerts are what the agents leave behind."""

import json
import math
import os
import tempfile
import time

import pytest

os.environ.setdefault("MLPE_STATE_DIR", tempfile.mkdtemp(prefix="mlpe-stream-unit-"))
from sim_seconds import scenario, seconds

from mlpe.stream import app as stream
from mlpe.v1 import alerts_pb2 as al
from mlpe.v1.training_pb2 import TrainStep


@pytest.fixture()
def alerts(monkeypatch):
    """What the agents publish (the Kafka send is the one thing replaced)."""
    out: list[al.Alert] = []

    async def send(key, value):
        out.append(al.Alert.FromString(value))

    monkeypatch.setattr(stream.alerts_topic, "send", send)
    monkeypatch.setattr(stream, "annotations", [])
    stream.app.finalize()
    stream.app.flow_control.resume()
    stream.peer_buckets.clear()
    for table in (stream.gpu_series, stream.peer_groups, stream.train_jobs):
        table.data.clear()
    return out


def reports(s, duration_s: int, job: str = "job-a"):
    for start, nodes in seconds(s, duration_s):
        for node, gpus in nodes.items():
            yield json.dumps({"job": job, "node": node, "start_ns": start, "gpus": {
                gpu: {k: (v if math.isfinite(v) else None) for k, v in values.items()
                      if k in stream.SECOND_FIELDS} for gpu, values in gpus.items()}}).encode()


async def test_detect_gpus_finds_a_straggler_and_keeps_state_in_tables(alerts):
    async with stream.detect_gpus.test_context() as agent:
        for raw in reports(scenario(("straggler", 1, 4, 20, 15)), 40):
            await agent.put(raw)
    firing = [a for a in alerts if a.state == al.ALERT_FIRING]
    assert [(a.rule, a.labels["node"], a.labels["gpu"]) for a in firing] == [
        ("peer_low_sm_clock", "sim-node-01", "4")]
    assert "below its peers" in firing[0].summary and firing[0].detector == "peer"
    assert stream.peer_groups["job-a"]["last_start"] > 0
    assert stream.gpu_series["sim-node-01/4"]["baseline"]["busy_s"] > 20


async def test_detect_gpus_dead_letters_a_bad_report_and_goes_on(alerts, monkeypatch):
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


async def test_train_steps_nan_loss_alert_and_job_state(alerts, monkeypatch):
    monkeypatch.setattr(stream, "WINDOWS", [])  # windows are tested elsewhere
    async with stream.train_steps.test_context() as agent:
        for n in range(1, 51):
            for rank in (0, 1):
                await agent.put(step(n, rank, math.nan if n == 25 else 2.0))
    assert [(a.rule, a.state) for a in alerts] == [
        ("training_loss_nonfinite", al.ALERT_FIRING), ("training_loss_nonfinite",
                                                       al.ALERT_RESOLVED)]
    state = stream.train_jobs["job-t"]
    assert state["steps"] == 50 and state["ranks"] == {"0": 50, "1": 50}


async def test_a_completed_job_is_not_reported_stalled(alerts, monkeypatch):
    monkeypatch.setattr(stream, "WINDOWS", [])
    monkeypatch.setattr(stream, "stalled_jobs", set())
    async with stream.train_steps.test_context() as agent:
        for n in range(1, 31):
            for rank in (0, 1):
                await agent.put(step(n, rank))
        for rank in (0, 1):  # each rank's last message: it halted, no step follows
            await agent.put(TrainStep(job_id="job-t", rank=rank, world_size=2, step=30,
                                      time_ns=HOUR_AGO_NS + 31 * 500_000_000,
                                      halt="completed").SerializeToString())
    assert stream.train_jobs["job-t"]["halt"][0] == "completed"
    assert stream.new_stalls(time.time_ns()) == []  # an hour of silence, but it halted
    assert alerts == []
    stream.train_jobs.data["job-t"] = {**stream.train_jobs["job-t"], "halt": None}
    assert [a.rule for a in stream.new_stalls(time.time_ns())] == ["training_stalled"]


def test_parse_step_names_every_problem():
    bad = TrainStep(job_id="", rank=3, world_size=2, step=0, time_ns=5,
                    tokens_per_s=math.inf, step_time_s=-1).SerializeToString()
    with pytest.raises(ValueError) as err:
        stream.parse_step(bad)
    for words in ("job_id is empty", "rank 3 does not fit world_size 2", "step 0",
                  "time_ns 5", "tokens_per_s inf", "step_time_s -1"):
        assert words in str(err.value)
    with pytest.raises(ValueError, match="not a TrainStep"):
        stream.parse_step(b"\xff\xff\xff")
    halted = TrainStep(job_id="j", rank=0, world_size=1, step=0, time_ns=time.time_ns(),
                       halt="paused")  # before its first step, and no rates: fine
    assert stream.parse_step(halted.SerializeToString()).halt == "paused"
    halted.halt = "napping"
    with pytest.raises(ValueError, match="halt 'napping' is not one of completed, paused"):
        stream.parse_step(halted.SerializeToString())
