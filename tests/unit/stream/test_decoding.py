"""Bytes into checked values: metric batches, GPU-seconds reports and TrainSteps."""

import json
import math
import time

import numpy as np
import pytest

from mlpe.common import batches
from mlpe.stream.decoding import (
    SECOND_FIELDS,
    ClockError,
    Limits,
    StepRow,
    gpu_second_reports,
    parse_batch,
    parse_report,
    parse_step,
)
from mlpe.stream.windows import TRAIN_KIND, Closed, DeviceMeans, WindowSet
from mlpe.v1 import metrics_pb2 as pb
from mlpe.v1.training_pb2 import TrainStep

NOW_NS = time.time_ns() // 10**9 * 10**9  # a whole second


def metric_batch(first_ns: int, n: int = 10) -> batches.Batch:
    times = first_ns + np.arange(n, dtype=np.int64) * 10_000_000
    return batches.Batch("n1", pb.DEVICE_KIND_GPU, 0, "", 1, 0, 0, times,
                         {pb.GPU_POWER: np.arange(n, dtype=np.float64)})


def test_parse_batch_refuses_a_broken_clock():
    assert parse_batch(batches.encode(metric_batch(NOW_NS))).samples == 10
    with pytest.raises(batches.BatchError, match="not a plausible time"):
        parse_batch(batches.encode(metric_batch(1_000 * 10**9)))  # 1970
    with pytest.raises(ClockError, match=r"172800\.0 s ahead of this worker's clock") as err:
        parse_batch(batches.encode(metric_batch(NOW_NS + 2 * 86_400 * 10**9)),
                    now_ns=NOW_NS + 90_000_000)
    assert err.value.node == "n1"
    assert parse_batch(batches.encode(metric_batch(NOW_NS + 5 * 10**9)),  # within 10 s
                       now_ns=NOW_NS).samples == 10
    with pytest.raises(batches.BatchError):
        parse_batch(b"\x08\x96\x01 not a batch")


def closed(node: str, gpu: int, start_ns: int, width_ns: int = 10**9, job: str = "j",
           kind: int = pb.DEVICE_KIND_GPU) -> Closed:
    return Closed(lines=[], tokens=[], start_ns=start_ns, end_ns=start_ns + width_ns,
                  node=node, kind=kind, devices=[DeviceMeans(gpu, job, {
                      "util": 90.0, "temp": math.nan, "power": 300.0})])


def test_gpu_second_reports_round_trip_through_parse_report():
    reports = gpu_second_reports([
        closed("n1", 0, NOW_NS), closed("n1", 1, NOW_NS), closed("n2", 0, NOW_NS),
        closed("n1", 0, NOW_NS, width_ns=10 * 10**9),          # a 10 s window: not reported
        closed("h1", 0, NOW_NS, kind=pb.DEVICE_KIND_HOST)])    # a host: not reported
    assert [(job, r["node"], sorted(r["gpus"])) for job, r in reports] == [
        ("j", "n1", ["0", "1"]), ("j", "n2", ["0"])]
    gpu = reports[0][1]["gpus"]["0"]
    assert gpu == {"util": 90.0, "temp": None}  # NaN as null; only the detectors' fields
    assert set(gpu) <= SECOND_FIELDS
    again = parse_report(json.dumps(reports[0][1]).encode())
    assert again == {**reports[0][1], "start_ns": NOW_NS, "job": "j"}


def test_parse_report_refuses_what_the_detectors_cannot_read():
    assert parse_report(b'{"node": "n", "start_ns": "5", "gpus": {}}')["job"] == ""
    for raw in (b"{not json", b'{"node": "n", "gpus": {}}',
                b'{"node": "", "start_ns": 1, "gpus": {}}',
                b'{"node": "n", "start_ns": 1, "gpus": {"0": {"util": "high"}}}',
                b'{"node": "n\\nx", "start_ns": 1, "gpus": {}}',
                b'{"node": "n", "job": "<!channel>", "start_ns": 1, "gpus": {}}',
                b'{"node": "n", "job": 5, "start_ns": 1, "gpus": {}}',
                b'{"node": "n", "start_ns": 1, "gpus": {"0,x=1": {}}}',
                b'{"node": "n", "start_ns": 1, "gpus": {"0": {"util": true}}}',
                b'[1, 2]'):
        with pytest.raises(ValueError, match="not a GPU-seconds report"):
            parse_report(raw)


def test_parse_step_names_every_problem():
    bad = TrainStep(job_id="", rank=3, world_size=2, step=0, time_ns=5,
                    tokens_per_s=math.inf, step_time_s=-1).SerializeToString()
    with pytest.raises(ValueError) as err:
        parse_step(bad)
    for words in ("job_id is empty", "rank 3 does not fit world_size 2", "step 0",
                  "time_ns 5", "tokens_per_s inf", "step_time_s -1"):
        assert words in str(err.value)
    with pytest.raises(ValueError, match="not a TrainStep"):
        parse_step(b"\xff\xff\xff")
    halted = TrainStep(job_id="j", rank=0, world_size=1, step=0, time_ns=time.time_ns(),
                       halt="paused")  # before its first step, and no rates: fine
    assert parse_step(halted.SerializeToString()).halt == "paused"
    halted.halt = "napping"
    with pytest.raises(ValueError, match="halt 'napping' is not one of completed, paused"):
        parse_step(halted.SerializeToString())


def test_a_step_row_is_a_training_window_per_job_and_rank():
    windows = WindowSet(1.0, lateness_s=0.0, idle_s=60)
    for n in range(4):  # steps at 0, 0.25, 0.5, 0.75 s, then one in the next second
        msg = TrainStep(job_id="job-x", rank=1, world_size=2, step=n + 1,
                        time_ns=NOW_NS + n * 250_000_000, loss=2.0 - n / 10,
                        tokens_per_s=1000.0, step_time_s=0.25, mem_allocated_bytes=2**31)
        assert windows.add("p", StepRow(msg), token=n) == 1
    windows.add("p", StepRow(TrainStep(job_id="job-x", rank=1, world_size=2, step=5,
                                       time_ns=NOW_NS + 10**9)), token=4)
    [window] = windows.close_ready()
    assert window.kind == TRAIN_KIND and window.tokens == [0, 1, 2, 3]
    (line,) = window.lines
    assert line.startswith("train,job=job-x,rank=1,window=1s ")
    (rank,) = window.devices
    assert rank.means["loss"] == pytest.approx(1.85)
    assert rank.means["mem_allocated_gib"] == 2.0
    assert "samples=4i" in line


def node_batch(**changes) -> bytes:
    times = NOW_NS + np.arange(10, dtype=np.int64) * 10_000_000
    fields = dict(node="n1", devices=2, uuid="GPU-0", job="", samples=None)
    fields.update(changes)
    if fields["samples"] is not None:
        times = NOW_NS + np.arange(fields["samples"], dtype=np.int64)
    node = batches.join([batches.Batch(fields["node"], pb.DEVICE_KIND_GPU, g, fields["uuid"],
                                       1, 0, 0, times, {pb.GPU_POWER: np.ones(len(times))},
                                       job_id=fields["job"])
                         for g in range(fields["devices"])])
    return batches.encode(node)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"node": "n1\nmem,x=1 y=2"}, "node_id 'n1\\\\nmem,x=1 y=2' is not 1-128 characters"),
    ({"node": "<!channel>"}, "node_id '<!channel>' is not"),
    ({"node": "n" * 200}, r"node_id 'n{40}'\.\.\. is not"),
    ({"job": "job a"}, "job_id 'job a' is not"),
    ({"uuid": "GPU-0,evil=1"}, "device uuid 'GPU-0,evil=1' is not"),
    ({"devices": 65}, r"65 devices, more than 64 \(MLPE_STREAM_MAX_DEVICES\)"),
    ({"samples": 6001}, r"6001 samples per device, more than 6000"),
])
def test_hostile_identifiers_and_sizes_are_refused(changes, reason):
    with pytest.raises(batches.BatchError, match=reason):
        parse_batch(node_batch(**changes), Limits(), now_ns=NOW_NS + 10**9)


def test_limits_come_from_settings():
    from mlpe.common.settings import SettingsError
    from mlpe.common.settings import load as load_settings

    limits = Limits.of(load_settings({"MLPE_STREAM_MAX_DEVICES": "8",
                                      "MLPE_STREAM_CLOCK_TOLERANCE_S": "2"}))
    assert (limits.max_devices, limits.clock_tolerance_s) == (8, 2.0)
    with pytest.raises(SettingsError, match="MLPE_STREAM_MAX_DEVICES='lots': expected a "
                                            "whole number from 1 to 4096"):
        load_settings({"MLPE_STREAM_MAX_DEVICES": "lots"})


def test_a_step_of_a_hostile_job_or_world_is_refused():
    for msg, reason in ((TrainStep(job_id="a\nb", rank=0, world_size=1, step=1,
                                   time_ns=NOW_NS), "job_id"),
                        (TrainStep(job_id="j", rank=0, world_size=10**7, step=1,
                                   time_ns=NOW_NS), "world_size 10000000 is more than 65536")):
        with pytest.raises(ValueError, match=reason):
            parse_step(msg.SerializeToString(), now_ns=NOW_NS)
