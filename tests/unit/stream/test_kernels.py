"""KernelSummary bytes into `kernel` points: checked, whole or refused with a reason."""

import math
import time

import pytest

from mlpe.stream.kernels import MAX_KERNELS, kernel_lines
from mlpe.v1.training_pb2 import KernelSummary

NOW_NS = time.time_ns()


def summary(**overrides) -> KernelSummary:
    msg = KernelSummary(job_id="job-1", rank=3, first_step=11, last_step=20, time_ns=NOW_NS,
                        backend="triton")
    msg.kernels.add(op="rmsnorm", direction="forward", calls=40, total_ms=8.0, p50_ms=0.19,
                    p99_ms=0.4, max_ms=0.5, bytes_moved=4e6)
    msg.kernels.add(op="swiglu", direction="backward", calls=20, total_ms=6.0, p50_ms=0.3,
                    p99_ms=0.31, max_ms=0.32)
    for name, value in overrides.items():
        setattr(msg, name, value)
    return msg


def parse(line: str) -> tuple[str, dict, dict, int]:
    """A line of ours (no escapes: tags are plain names) back into its parts."""
    series, fields, ts = line.split(" ")
    measurement, *tags = series.split(",")
    return (measurement, dict(t.split("=") for t in tags),
            dict(f.split("=") for f in fields.split(",")), int(ts))


def test_one_point_per_op_and_direction_with_gbps_when_bytes_are_known():
    lines = kernel_lines(summary().SerializeToString())
    (m1, tags1, fields1, ts1), (_, tags2, fields2, _) = map(parse, lines)
    assert m1 == "kernel" and ts1 == NOW_NS
    assert tags1 == {"job": "job-1", "rank": "3", "op": "rmsnorm", "direction": "forward",
                     "backend": "triton"}
    assert fields1["calls"] == "40i" and float(fields1["p50_ms"]) == 0.19
    assert float(fields1["p99_ms"]) == 0.4 and float(fields1["max_ms"]) == 0.5
    assert fields1["first_step"] == "11i" and fields1["last_step"] == "20i"
    # 4 MB per call x 40 calls in 8 ms = 20 GB/s
    assert math.isclose(float(fields1["gbps"]), 20.0)
    assert tags2["op"] == "swiglu" and "gbps" not in fields2  # bytes unknown: no bandwidth


@pytest.mark.parametrize("hostile", ["a\nkernel,job=x calls=1i 1", "a,b=c", "a b", "a=b",
                                     'a"b', "a\\", "<!channel>", "", "x" * 129, "é"])
def test_identifiers_that_could_change_line_protocol_are_refused(hostile):
    for field in ("job_id", "backend"):
        if field == "backend" and hostile == "":
            continue  # an unset backend is written as "unknown"
        with pytest.raises(ValueError, match=f"KernelSummary: {field} .* is not 1-128"):
            kernel_lines(summary(**{field: hostile}).SerializeToString())
    for field in ("op", "direction"):
        msg = summary()
        setattr(msg.kernels[0], field, hostile)
        with pytest.raises(ValueError, match=f"KernelSummary: {field} .* is not 1-128"):
            kernel_lines(msg.SerializeToString())


@pytest.mark.parametrize("field", ["total_ms", "p50_ms", "p99_ms", "max_ms", "bytes_moved"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0])
def test_a_timing_that_is_not_a_finite_non_negative_number_refuses_the_summary(field, value):
    msg = summary()
    setattr(msg.kernels[1], field, value)
    with pytest.raises(ValueError, match=r"swiglu\.backward .* must be finite and >= 0"):
        kernel_lines(msg.SerializeToString())


@pytest.mark.parametrize("overrides, reason", [
    ({"rank": -1}, "rank -1 is not in"),
    ({"rank": 1 << 20}, "rank 1048576 is not in"),
    ({"first_step": 21}, "steps 21..20"),
    ({"first_step": -1}, "steps -1..20"),
    ({"time_ns": 1_000}, "not a plausible time"),
    ({"time_ns": NOW_NS + 2 * 86_400 * 10**9}, "not a plausible time"),
])
def test_impossible_headers_are_refused(overrides, reason):
    with pytest.raises(ValueError, match=reason):
        kernel_lines(summary(**overrides).SerializeToString())


def test_counts_and_repeats_are_bounded():
    empty = KernelSummary(job_id="j", rank=0, first_step=1, last_step=1, time_ns=NOW_NS)
    with pytest.raises(ValueError, match="0 kernels"):
        kernel_lines(empty.SerializeToString())
    many = summary()
    for i in range(MAX_KERNELS):
        many.kernels.add(op=f"op{i}", direction="forward", calls=1)
    with pytest.raises(ValueError, match=f"kernels, not 1..{MAX_KERNELS}"):
        kernel_lines(many.SerializeToString())
    twice = summary()
    twice.kernels.add().CopyFrom(twice.kernels[0])
    with pytest.raises(ValueError, match=r"rmsnorm\.forward appears twice"):
        kernel_lines(twice.SerializeToString())
    zero = summary()
    zero.kernels[0].calls = 0
    with pytest.raises(ValueError, match="calls >= 1"):
        kernel_lines(zero.SerializeToString())


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", summary().SerializeToString()[:-3],
                                 b"\x0a\x05job"])
def test_bytes_that_are_not_a_summary_are_refused(raw):
    with pytest.raises(ValueError, match="not a KernelSummary"):
        kernel_lines(raw)
