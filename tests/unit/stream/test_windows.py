"""Tumbling windows: exact statistics, event-time closing, lateness, idle partitions."""

import numpy as np
import pytest

from mlpe.common import batches
from mlpe.stream.windows import WindowSet
from mlpe.v1 import metrics_pb2 as pb

T0 = 1_700_000_000 * 10**9  # a whole second


def batch(first: int, n: int, values, node="n1", gpu=0, fields=(pb.GPU_POWER,)):
    times = T0 + (first + np.arange(n)) * 10_000_000  # 100 Hz
    cols = {f: np.asarray(values, dtype=np.float64) + i for i, f in enumerate(fields)}
    return batches.Batch(node, pb.DEVICE_KIND_GPU, gpu, "", 1, 0, 0, times, cols)


def parse(line: str) -> tuple[str, dict, int]:
    head, body, ts = line.split(" ")
    fields = {}
    for kv in body.split(","):
        k, v = kv.split("=")
        fields[k] = int(v[:-1]) if v.endswith("i") else float(v)
    return head, fields, int(ts)


def test_one_second_window_statistics():
    w = WindowSet(1.0, lateness_s=0.5, idle_s=60)
    values = np.arange(100, dtype=float)
    for i in range(10):
        w.add(0, batch(10 * i, 10, values[10 * i:10 * i + 10]), token=i)
    assert w.close_ready() == []              # event time has not passed end + lateness
    w.add(0, batch(150, 10, np.zeros(10)), token=10)
    closed = w.close_ready()
    assert len(closed) == 1
    head, f, ts = parse(closed[0].line)
    assert head == "gpu,node=n1,window=1s,gpu=0" and ts == T0
    assert (f["power_min"], f["power_max"], f["power_last"], f["samples"]) == (0, 99, 99, 100)
    assert f["power_mean"] == pytest.approx(49.5)
    assert f["power_p95"] == pytest.approx(np.percentile(values, 95))
    assert closed[0].tokens == list(range(10))


def test_nan_is_skipped_and_all_nan_field_left_out():
    w = WindowSet(1.0, 0.0, 60)
    v = np.array([1.0, np.nan, 3.0, np.nan])
    w.add(0, batch(0, 4, v, fields=(pb.GPU_POWER, pb.GPU_TEMP)), token="a")
    w.add(0, batch(0, 4, np.full(4, np.nan), fields=(pb.GPU_UTIL,), gpu=1), token="b")
    closed = {c.line.split(" ")[0]: parse(c.line)[1] for c in w.close_ready(flush_all=True)}
    gpu0 = closed["gpu,node=n1,window=1s,gpu=0"]
    assert (gpu0["power_mean"], gpu0["power_last"], gpu0["temp_max"]) == (2.0, 3.0, 4.0)
    assert not any(k.startswith("util") for k in closed["gpu,node=n1,window=1s,gpu=1"])


def test_batch_spanning_two_windows_and_ten_second_width():
    w1, w10 = WindowSet(1.0, 0.0, 60), WindowSet(10.0, 0.0, 60)
    for w in (w1, w10):
        w.add(0, batch(0, 10, np.arange(10)), token="w")    # the device starts at 0 s
        w.add(0, batch(95, 10, np.arange(10)), token="x")   # 0.95 s .. 1.04 s
        w.add(0, batch(1000, 1, [0]), token="y")            # pushes event time to 10 s
    ones = [parse(c.line) for c in w1.close_ready()]
    assert [(ts - T0, f["samples"]) for _, f, ts in ones] == [(0, 15), (10**9, 5)]
    tens = w10.close_ready()
    assert [parse(c.line)[1]["samples"] for c in tens] == [20]


def test_first_data_mid_window_is_not_written():
    """After a crash, replay can start mid-window (the rest was committed and written
    before): that tail must not overwrite the complete window."""
    w = WindowSet(1.0, 0.0, 60)
    w.add(0, batch(40, 10, np.ones(10)), token="tail")   # 0.40 s: mid-window
    w.add(0, batch(100, 10, np.ones(10)), token="next")  # 1.00 s: a whole window starts
    w.add(0, batch(300, 1, [1]), token="push")
    closed = w.close_ready()
    assert [parse(c.line)[2] - T0 for c in closed] == [10**9]
    assert w.partial_skipped == 10


def test_late_data_for_a_written_window_is_counted_not_rewritten():
    w = WindowSet(1.0, 0.0, 60)
    w.add(0, batch(0, 10, np.ones(10)), token=1)
    w.add(0, batch(200, 10, np.ones(10)), token=2)
    assert len(w.close_ready()) == 1
    w.add(0, batch(10, 10, np.ones(10)), token=3)  # belongs to the window already written
    assert w.late_samples == 10


def test_first_sample_within_one_interval_of_the_start_begins_the_window():
    """Replay from a commit whose event starts the window (its first sample 5 ms after
    the window start at 100 Hz): no earlier sample can be in that window, so it is no
    tail, and skipping it would leave the window never written."""
    w = WindowSet(1.0, 0.0, 60)
    b = batch(100, 10, np.ones(10))
    b.timestamps_ns = b.timestamps_ns + 5_000_000  # 1.005 s .. 1.095 s
    w.add(0, b, token="head")
    w.add(0, batch(300, 1, [1]), token="push")
    (closed,) = w.close_ready()
    assert parse(closed.line)[2] - T0 == 10**9 and w.partial_skipped == 0


def test_idle_partition_writes_its_windows_provisionally_then_final():
    w = WindowSet(1.0, 0.5, idle_s=2.0, final_idle_s=10.0)
    w.add(3, batch(0, 10, np.ones(10)), token=1)
    assert w.close_ready(now=w.last_seen[3] + 1.0) == []
    (provisional,) = w.close_ready(now=w.last_seen[3] + 2.5)
    assert not provisional.final and provisional.tokens == []  # its events stay held
    assert parse(provisional.line)[1]["samples"] == 10
    assert w.close_ready(now=w.last_seen[3] + 5.0) == []  # written once, not every pass
    (final,) = w.close_ready(now=w.last_seen[3] + 10.0)
    assert final.final and final.tokens == [1] and final.line == ""  # nothing new to write


def test_the_rest_of_a_provisional_window_rewrites_it_whole():
    """An agent paused mid-second: the window written meanwhile must not be replaced by
    its tail when the rest comes (last write wins in InfluxDB)."""
    w = WindowSet(1.0, 0.5, idle_s=2.0)
    for i in range(3):
        w.add(0, batch(10 * i, 10, np.ones(10)), token=i)
    (provisional,) = w.close_ready(now=w.last_seen[0] + 2.5)
    assert parse(provisional.line)[1]["samples"] == 30
    for i in range(3, 10):
        w.add(0, batch(10 * i, 10, np.ones(10)), token=i)
    w.add(0, batch(200, 1, [1]), token="push")  # event time passes the window
    (final,) = w.close_ready()
    assert final.final and parse(final.line)[1]["samples"] == 100
    assert final.tokens == list(range(10)) and w.late_samples == 0


def test_partitions_and_nodes_are_separate():
    w = WindowSet(1.0, 0.0, 60)
    w.add(0, batch(0, 10, np.ones(10), node="a"), token=1)
    w.add(1, batch(0, 10, np.ones(10), node="b"), token=2)
    w.add(0, batch(200, 1, [1], node="a"), token=3)
    closed = w.close_ready()
    assert [c.line.split(",")[1] for c in closed] == ["node=a"]  # b's partition has not moved


def test_silence_with_unread_data_is_not_idleness():
    w = WindowSet(1.0, 0.5, idle_s=2.0)
    w.add(3, batch(0, 10, np.ones(10)), token=1)
    later = w.last_seen[3] + 15
    assert w.close_ready(now=later, backlog=lambda p: True) == []  # busy, not silent
    assert [c.final for c in w.close_ready(now=later, backlog=lambda p: False)] == [True]


def test_the_same_batch_twice_counts_once():
    w = WindowSet(1.0, lateness_s=0.5, idle_s=60)
    for i in range(10):
        w.add(0, batch(10 * i, 10, np.full(10, float(i))), token=i)
        if i == 4:  # a resend of batch 4 (at-least-once delivery)
            assert w.add(0, batch(40, 10, np.full(10, 4.0)), token="again") == 0
    w.add(0, batch(150, 10, np.zeros(10)), token=10)
    (closed,) = w.close_ready()
    assert parse(closed.line)[1]["samples"] == 100 and "again" not in closed.tokens
    assert w.duplicate_samples == 10


def test_a_gpu_of_a_job_is_tagged_with_it():
    w = WindowSet(1.0, lateness_s=0.0, idle_s=60)
    b = batch(0, 10, np.ones(10))
    b.job_id = "llm,7"
    w.add(0, b, token=0)
    (closed,) = w.close_ready(flush_all=True)
    assert parse(closed.line)[0] == r"gpu,node=n1,window=1s,gpu=0,job=llm\,7"
