"""Job specs (defaults, every bad field named), the LR schedule and fault injection."""

import pytest

from mlpe.common.jobs import resolve
from mlpe.v1 import control_pb2 as c
from mlpe.worker.train import Fault, lr_at


def test_defaults_are_filled_in():
    resolved, problems = resolve(c.JobSpec(steps=10, model=c.ModelSpec(preset="tiny",
                                                                       layers=3)))
    assert problems == []
    assert resolved["model"]["layers"] == 3 and resolved["model"]["hidden"] == 64
    assert (resolved["world_size"], resolved["micro_batch"], resolved["global_batch"]) == \
        (1, 1, 1)
    assert resolved["optimizer"]["weight_decay"] == 0.1
    assert resolved["checkpoint"]["keep"] == 3 and resolved["hang_timeout_s"] == 120


def test_an_explicit_zero_weight_decay_is_kept():
    spec = c.JobSpec(steps=1, optimizer=c.OptimizerSpec(weight_decay=0.0))
    assert resolve(spec)[0]["optimizer"]["weight_decay"] == 0.0


def test_every_bad_field_is_named_at_once():
    spec = c.JobSpec(steps=0, world_size=2, micro_batch=3, global_batch=4, precision="fp8",
                     device="tpu", recompute="half", max_restarts=-1, hang_timeout_s=0.5,
                     model=c.ModelSpec(preset="nope", heads=-2),
                     data=c.DataSpec(kind="file"),
                     optimizer=c.OptimizerSpec(lr=-1, beta2=1.0, schedule="step"),
                     checkpoint=c.CheckpointPolicy(keep=-1))
    _, problems = resolve(spec)
    text = "\n".join(problems)
    for field in ("steps:", "global_batch: 4 is not a multiple", "precision:", "device:",
                  "recompute:", "max_restarts:", "hang_timeout_s:", "model.preset:",
                  "model.heads:", "data.path: required", "optimizer.lr:", "optimizer.beta2:",
                  "optimizer.schedule:", "checkpoint:"):
        assert field in text, field


def test_model_shape_errors_come_from_the_model_config():
    _, problems = resolve(c.JobSpec(steps=1, model=c.ModelSpec(hidden=100, heads=3)))
    assert any("not divisible by model.heads" in p for p in problems)


def test_bf16_needs_a_gpu():
    _, problems = resolve(c.JobSpec(steps=1, precision="bf16", device="cpu"))
    assert any(p.startswith("precision: bf16") for p in problems)


def test_learning_rate_warms_up_then_follows_a_cosine_to_the_floor():
    opt = {"lr": 1.0, "warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1}
    assert lr_at(5, opt, 110) == pytest.approx(0.5)
    assert lr_at(10, opt, 110) == pytest.approx(1.0)
    assert lr_at(60, opt, 110) == pytest.approx(0.55)
    assert lr_at(110, opt, 110) == pytest.approx(0.1)
    assert lr_at(50, {**opt, "schedule": "constant"}, 110) == 1.0


def test_fault_injection_spec(tmp_path):
    assert Fault("", tmp_path, 0).step == 0
    assert Fault("hang@12:1", tmp_path, 1).step == 12
    assert Fault("hang@12:1", tmp_path, 0).step == 0
    with pytest.raises(ValueError, match="expected hang@STEP"):
        Fault("crash@3", tmp_path, 0)
