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


def _seen(w: WindowSet) -> float:
    """When the (only) source of `w` was last heard from."""
    (seen,) = w.last_seen.values()
    return seen


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
    head, f, ts = parse(closed[0].lines[0])
    assert head == "gpu,node=n1,window=1s,gpu=0" and ts == T0
    assert (f["power_min"], f["power_max"], f["power_last"], f["samples"]) == (0, 99, 99, 100)
    assert f["power_mean"] == pytest.approx(49.5)
    assert "power_p95" not in f  # a 1 s window's p95 is next to its max: not written
    assert closed[0].tokens == list(range(10))


def test_ten_second_windows_carry_the_p95():
    w = WindowSet(10.0, lateness_s=0.0, idle_s=60)
    values = np.random.default_rng(0).normal(300.0, 20.0, 1000)
    w.add(0, batch(0, 1000, values), token=0)
    (closed,) = w.close_ready(flush_all=True)
    head, f, _ = parse(closed.lines[0])
    assert head == "gpu,node=n1,window=10s,gpu=0" and f["samples"] == 1000
    assert f["power_p95"] == pytest.approx(np.percentile(values, 95))
    assert (f["power_min"], f["power_max"], f["power_last"]) == (
        values.min(), values.max(), values[-1])


def test_nan_is_skipped_and_all_nan_field_left_out():
    w = WindowSet(1.0, 0.0, 60)
    v = np.array([1.0, np.nan, 3.0, np.nan])
    w.add(0, batch(0, 4, v, fields=(pb.GPU_POWER, pb.GPU_TEMP)), token="a")
    w.add(0, batch(0, 4, np.full(4, np.nan), fields=(pb.GPU_UTIL,), gpu=1), token="b")
    closed = {c.lines[0].split(" ")[0]: parse(c.lines[0])[1] for c in w.close_ready(flush_all=True)}
    gpu0 = closed["gpu,node=n1,window=1s,gpu=0"]
    assert (gpu0["power_mean"], gpu0["power_last"], gpu0["temp_max"]) == (2.0, 3.0, 4.0)
    assert not any(k.startswith("util") for k in closed["gpu,node=n1,window=1s,gpu=1"])


def test_batch_spanning_two_windows_and_ten_second_width():
    w1, w10 = WindowSet(1.0, 0.0, 60), WindowSet(10.0, 0.0, 60)
    for w in (w1, w10):
        w.add(0, batch(0, 10, np.arange(10)), token="w")    # the device starts at 0 s
        w.add(0, batch(95, 10, np.arange(10)), token="x")   # 0.95 s .. 1.04 s
        w.add(0, batch(1000, 1, [0]), token="y")            # pushes event time to 10 s
    ones = [parse(c.lines[0]) for c in w1.close_ready()]
    assert [(ts - T0, f["samples"]) for _, f, ts in ones] == [(0, 15), (10**9, 5)]
    tens = w10.close_ready()
    assert [parse(c.lines[0])[1]["samples"] for c in tens] == [20]


def test_first_data_mid_window_is_not_written():
    """After a crash, replay can start mid-window (the rest was committed and written
    before): that tail must not overwrite the complete window."""
    w = WindowSet(1.0, 0.0, 60)
    w.add(0, batch(40, 10, np.ones(10)), token="tail")   # 0.40 s: mid-window
    w.add(0, batch(100, 10, np.ones(10)), token="next")  # 1.00 s: a whole window starts
    w.add(0, batch(300, 1, [1]), token="push")
    closed = w.close_ready()
    assert [parse(c.lines[0])[2] - T0 for c in closed] == [10**9]
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
    assert parse(closed.lines[0])[2] - T0 == 10**9 and w.partial_skipped == 0


def test_idle_partition_writes_its_windows_provisionally_then_final():
    w = WindowSet(1.0, 0.5, idle_s=2.0, final_idle_s=10.0)
    w.add(3, batch(0, 10, np.ones(10)), token=1)
    assert w.close_ready(now=_seen(w) + 1.0) == []
    (provisional,) = w.close_ready(now=_seen(w) + 2.5)
    assert not provisional.final and provisional.tokens == []  # its events stay held
    assert parse(provisional.lines[0])[1]["samples"] == 10
    assert w.close_ready(now=_seen(w) + 5.0) == []  # written once, not every pass
    (final,) = w.close_ready(now=_seen(w) + 10.0)
    assert final.final and final.tokens == [1] and final.lines == []  # nothing new to write


def test_the_rest_of_a_provisional_window_rewrites_it_whole():
    """An agent paused mid-second: the window written meanwhile must not be replaced by
    its tail when the rest comes (last write wins in InfluxDB)."""
    w = WindowSet(1.0, 0.5, idle_s=2.0)
    for i in range(3):
        w.add(0, batch(10 * i, 10, np.ones(10)), token=i)
    (provisional,) = w.close_ready(now=_seen(w) + 2.5)
    assert parse(provisional.lines[0])[1]["samples"] == 30
    for i in range(3, 10):
        w.add(0, batch(10 * i, 10, np.ones(10)), token=i)
    w.add(0, batch(200, 1, [1]), token="push")  # event time passes the window
    (final,) = w.close_ready()
    assert final.final and parse(final.lines[0])[1]["samples"] == 100
    assert final.tokens == list(range(10)) and w.late_samples == 0


def test_partitions_and_nodes_are_separate():
    w = WindowSet(1.0, 0.0, 60)
    w.add(0, batch(0, 10, np.ones(10), node="a"), token=1)
    w.add(1, batch(0, 10, np.ones(10), node="b"), token=2)
    w.add(0, batch(200, 1, [1], node="a"), token=3)
    closed = w.close_ready()
    assert [c.lines[0].split(",")[1] for c in closed] == ["node=a"]  # b's partition has not moved


def test_silence_with_unread_data_is_not_idleness():
    w = WindowSet(1.0, 0.5, idle_s=2.0)
    w.add(3, batch(0, 10, np.ones(10)), token=1)
    later = _seen(w) + 15
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
    assert parse(closed.lines[0])[1]["samples"] == 100 and "again" not in closed.tokens
    assert w.duplicate_samples == 10


def test_a_gpu_of_a_job_is_tagged_with_it():
    w = WindowSet(1.0, lateness_s=0.0, idle_s=60)
    b = batch(0, 10, np.ones(10))
    b.job_id = "llm,7"
    w.add(0, b, token=0)
    (closed,) = w.close_ready(flush_all=True)
    assert parse(closed.lines[0])[0] == r"gpu,node=n1,window=1s,gpu=0,job=llm\,7"


def test_one_node_batch_makes_a_line_per_device_with_its_own_job():
    times = T0 + np.arange(100) * 10_000_000
    node = batches.join([
        batches.Batch("n1", pb.DEVICE_KIND_GPU, g, f"GPU-{g}", 1, 0, 0, times,
                      {pb.GPU_POWER: np.full(100, 100.0 * g), pb.GPU_TEMP: np.full(100, 40.0)})
        for g in range(8)])
    node.jobs = ["job-a"] * 4 + [""] * 4
    w = WindowSet(1.0, 0.0, 60)
    assert w.add(0, node, token="t") == 1
    (closed,) = w.close_ready(flush_all=True)
    assert len(closed.lines) == 8 and closed.tokens == ["t"]
    heads = [parse(line)[0] for line in closed.lines]
    assert heads[3] == "gpu,node=n1,window=1s,gpu=3,job=job-a"
    assert heads[4] == "gpu,node=n1,window=1s,gpu=4"
    assert [parse(line)[1]["power_mean"] for line in closed.lines] == [100.0 * g
                                                                      for g in range(8)]
    assert [(d.index, d.job, d.means["temp"]) for d in closed.devices][3] == (3, "job-a", 40.0)


def test_a_source_whose_clock_jumps_ahead_closes_only_its_own_windows():
    """One node stamping its batches 1,000 s ahead used to move the partition's event
    time: every other node's data on the partition was then "late" and dropped."""
    w = WindowSet(1.0, 0.3, 60)
    w.add(0, batch(0, 10, np.ones(10), node="ahead"), token="a0")
    w.add(0, batch(100_000, 10, np.ones(10), node="ahead"), token="a1")  # +1,000 s
    for i in range(30):  # 3 s of another node on the same partition
        w.add(0, batch(10 * i, 10, np.ones(10), node="fine"), token=i)
    assert w.late_samples == 0
    written = [c for c in w.close_ready() if c.node == "fine"]
    assert [parse(c.lines[0])[1]["samples"] for c in written] == [100, 100]


def test_a_stat_of_inf_is_no_reading():
    w = WindowSet(10.0, 0.0, 60)
    w.add(0, batch(0, 3, [1.0, np.inf, -np.inf]), token=0)
    (closed,) = w.close_ready(flush_all=True)
    fields = parse(closed.lines[0])[1]
    assert (fields["power_max"], fields["power_p95"], fields["samples"]) == (1.0, 1.0, 3)


def test_line_breaks_in_tags_cannot_start_a_line():
    w = WindowSet(1.0, 0.0, 60)
    w.add(0, batch(0, 10, np.ones(10), node="n\nevil,x=1 y=2"), token=0)
    (closed,) = w.close_ready(flush_all=True)
    assert "\n" not in closed.lines[0]
    assert closed.lines[0].startswith(r"gpu,node=n\nevil\,x\=1\ y\=2,window=1s")
