"""1 min windows from the final 10 s ones: exact where the statistics allow it, the
events held until the minute is written, a restart's tail never written."""

import numpy as np
import pytest

from mlpe.common import batches
from mlpe.stream.rollup import Rollup
from mlpe.stream.windows import WindowSet
from mlpe.v1 import metrics_pb2 as pb
from tests.unit.stream.test_windows import parse

M0 = 1_700_000_040 * 10**9  # a whole minute
HZ = 100
FIELDS = (pb.GPU_POWER, pb.GPU_TEMP)


def node_batch(first: int, values: np.ndarray) -> batches.NodeBatch:
    """Samples first.. (at 100 Hz from M0) of two GPUs: values (samples, 2 GPUs, 2 fields)."""
    times = M0 + (first + np.arange(len(values))) * (10**9 // HZ)
    return batches.join([batches.Batch("n1", pb.DEVICE_KIND_GPU, gpu, "", 1, 0, 0, times,
                                       {f: values[:, gpu, j] for j, f in enumerate(FIELDS)})
                         for gpu in range(2)])


def run(values: np.ndarray, first: int = 0, rollup: Rollup | None = None):
    """Every sample through 10 s windows into the rollup, 100 ms per batch; the closed
    windows out (10 s ones and minutes), the rest flushed."""
    tens, rollup = WindowSet(10.0, 0.0, idle_s=3600), rollup or Rollup()
    out = []
    for i in range(0, len(values), HZ // 10):
        tens.add(0, node_batch(first + i, values[i:i + HZ // 10]), token=first + i)
        out += rollup.roll(tens.close_ready(now=0.0), now=0.0)
    out += rollup.roll(tens.close_ready(flush_all=True), now=0.0)
    return out, rollup


def minutes(out) -> dict[tuple[int, str], dict]:
    return {(c.start_ns, line.split(" ")[0]): parse(line)[1]
            for c in out if c.end_ns - c.start_ns == 60 * 10**9 for line in c.lines}


def test_a_minute_is_its_samples_min_mean_max_and_last_and_holds_their_events():
    rng = np.random.default_rng(3)
    values = rng.normal(300, 40, size=(70 * HZ, 2, 2))
    values[1234:1300, 1, 0] = np.nan   # a gap in one field of one GPU
    out, _ = run(values)
    got = minutes(out)
    assert set(got) == {(M0, "gpu,node=n1,window=1m,gpu=0"),
                        (M0, "gpu,node=n1,window=1m,gpu=1")}  # 60..70 s: not a whole minute
    minute = values[:60 * HZ]
    for gpu in range(2):
        f = got[(M0, f"gpu,node=n1,window=1m,gpu={gpu}")]
        for j, name in enumerate(("power", "temp")):
            x = minute[:, gpu, j]
            x = x[np.isfinite(x)]
            assert f[f"{name}_min"] == x.min() and f[f"{name}_max"] == x.max()
            assert f[f"{name}_mean"] == pytest.approx(x.mean(), rel=1e-12)
            assert f[f"{name}_last"] == x[-1]
            # an upper bound of the minute's p95 (the largest 10 s p95), never above max
            assert np.percentile(x, 95) <= f[f"{name}_p95"] <= x.max()
        assert f["samples"] == 60 * HZ
    # The 10 s windows hand their events to the minute: released only once it is written.
    [minute_window] = [c for c in out if c.lines and c.lines[0].startswith("gpu,node=n1,window=1m")]
    tens = [c for c in out if c.end_ns - c.start_ns == 10 * 10**9]
    assert all(c.tokens == [] for c in tens) and len(tens) == 7
    assert minute_window.tokens == list(range(0, 60 * HZ, HZ // 10))


def test_the_minute_of_a_restart_that_began_mid_minute_is_not_written_but_released():
    values = np.ones((90 * HZ, 2, 2))
    out, rollup = run(values, first=25 * HZ)  # from M0 + 25 s: the tail of a minute
    got = minutes(out)
    assert {start for start, _ in got} == {M0 + 60 * 10**9}  # the next minute, whole
    assert rollup.tails_skipped == 1
    # Its 10 s windows' events go on at once (nothing waits for that minute).
    tail = [c for c in out if c.start_ns == M0 and c.end_ns == M0 + 60 * 10**9]
    assert all(c.lines == [] for c in tail) and [c.tokens[0] for c in tail if c.tokens] == \
        [30 * HZ, 40 * HZ, 50 * HZ]


def test_a_minute_whose_source_went_silent_is_written_then_rewritten_whole():
    rollup = Rollup(idle_s=30, final_idle_s=60)
    tens = WindowSet(10.0, 0.0, idle_s=3600)

    def send(first_s: int, seconds: int, now: float) -> list:
        for i in range(first_s * HZ, (first_s + seconds) * HZ, 10):
            tens.add(0, node_batch(i, np.full((10, 2, 2), 5.0)), token=i)
        return rollup.roll(tens.close_ready(flush_all=True), now=now)

    assert minutes(send(0, 20, now=100.0)) == {}
    provisional = rollup.roll([], now=130.0)  # silent for idle_s: written, events kept
    assert {f["samples"] for f in minutes(provisional).values()} == {20 * HZ}
    assert all(not c.final and c.tokens == [] for c in provisional)
    assert rollup.roll([], now=131.0) == []   # nothing new: not written again
    send(30, 10, now=140.0)                   # it spoke again, in the same minute
    final = rollup.roll([], now=200.0)        # silent for final_idle_s: whole, final
    assert {f["samples"] for f in minutes(final).values()} == {30 * HZ}
    [minute] = final
    assert minute.final and sorted(minute.tokens) == list(range(0, 20 * HZ, 10)) + \
        list(range(30 * HZ, 40 * HZ, 10))


def test_revoked_partitions_lose_their_open_minutes_unwritten():
    _, rollup = run(np.ones((30 * HZ, 2, 2)))
    assert rollup.open
    rollup.drop_partitions({0})
    assert not rollup.open and not rollup.seen
