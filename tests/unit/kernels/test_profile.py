"""Op timings for kernel events: recorded only while profiling is on, reported and reset."""

import torch

from mlpe.kernels import profile
from mlpe.kernels.rmsnorm import rmsnorm
from mlpe.kernels.swiglu import swiglu


def test_nothing_is_recorded_while_profiling_is_off():
    profile.report()
    rmsnorm(torch.randn(4, 8), torch.ones(8))
    assert profile.report() == {}


def test_each_op_reports_its_calls_and_times_then_resets():
    profile.report()
    x, w = torch.randn(64, 256), torch.ones(256)
    with profile.profiling():
        for _ in range(3):
            rmsnorm(x, w)
        swiglu(x, x)
    assert not profile.enabled()
    got = profile.report()
    assert set(got) == {"rmsnorm.forward", "swiglu.forward"}
    norm = got["rmsnorm.forward"]
    assert norm["calls"] == 3 and got["swiglu.forward"]["calls"] == 1
    assert 0 < norm["p50_ms"] <= norm["max_ms"] <= norm["total_ms"]
    assert abs(norm["mean_ms"] * 3 - norm["total_ms"]) < 1e-9
    # x and w read, the output (x's shape) written: the bytes for GB/s
    assert norm["bytes_per_call"] == (64 * 256 * 2 + 256) * 4
    assert profile.report() == {}


def test_report_can_leave_the_counts_in_place():
    with profile.profiling():
        swiglu(torch.randn(3), torch.randn(3))
    assert profile.report(reset=False)["swiglu.forward"]["calls"] == 1
    assert profile.report()["swiglu.forward"]["calls"] == 1


def test_the_optimizer_step_is_timed():
    from mlpe.kernels.adamw import FusedAdamW

    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    with profile.profiling():
        FusedAdamW([p]).step()
    step = profile.report()["adamw.step"]
    assert step["calls"] == 1 and step["bytes_per_call"] == 0  # no tensors in its arguments
