"""The planner against published training runs (mlpe.bench.published): the file, the
conversion of what authors report into tokens/s, the fit and what it is judged on."""

import statistics

import pytest

from mlpe.bench import published
from mlpe.optimizer.hardware import GPUS
from mlpe.optimizer.timing import CONSTANTS


@pytest.fixture(scope="module")
def runs():
    return published.load()


def test_every_run_has_a_source_and_a_layout_the_planner_evaluates(runs):
    assert len(runs) >= 8
    assert len({r.source.split(",")[0] for r in runs}) >= 3  # three papers or reports
    assert any(r.fit for r in runs) and any(not r.fit for r in runs)
    for run in runs:
        assert run.source and run.measured_tokens_per_s > 0
        assert run.predicted_tokens_per_s() > 0  # the layout runs on its cluster


def test_megatron_tflops_are_turned_into_tokens_per_s(runs):
    [trillion] = [r for r in runs if r.name == "megatron-gpt-1008b"]
    b, s, layers, h, v = 3072, 2048, 128, 25600, 51200
    step_flops = 96 * b * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))
    step_s = step_flops / (3072 * 163e12)  # 163 TFLOP/s on each of 3,072 GPUs
    assert step_s == pytest.approx(102.6, abs=0.1)
    assert trillion.measured_tokens_per_s == pytest.approx(b * s / step_s)


def test_mfu_is_turned_into_tokens_per_s(runs):
    [llama] = [r for r in runs if r.name == "llama3-405b-8192gpu"]
    flops = llama.model.flops_per_token(8192)
    assert llama.measured_tokens_per_s == pytest.approx(0.43 * 8192 * 989e12 / flops)


def test_the_error_is_judged_on_the_runs_held_out(runs):
    answer = published.report(runs)
    held = [abs(r["error_pct"]) for r in answer["published_runs"] if not r["used_to_fit"]]
    assert answer["published_err_p50_pct"] == pytest.approx(statistics.median(held), abs=0.06)
    assert answer["published_err_max_pct"] == pytest.approx(max(held), abs=0.06)


@pytest.mark.slow  # the whole grid, ~10 s
def test_the_shipped_constants_are_the_fitted_ones(runs):
    constants, achievable = published.calibrate(runs)
    assert constants == CONSTANTS
    assert achievable == {name: GPUS[name].achievable for name in achievable}


def test_a_bad_entry_is_refused_by_name(tmp_path):
    path = tmp_path / "runs.yaml"
    path.write_text("- name: broken\n  source: x\n  model: {layers: 2}\n  cluster: 1x8xA100\n"
                    "  layout: tp1\n  global_batch: 8\n  measured: {mfu: 0.4}\n  fit: true\n")
    with pytest.raises(ValueError, match=r"runs.yaml: run 1 \(broken\): .*model\."):
        published.load(path)
