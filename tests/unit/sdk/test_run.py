"""mlpe.sdk without a controller (python or plain torchrun): decisions, reports, the
checkpoint policy, save/load of modules, optimizers and plain values, SIGTERM."""

import os
import signal

import pytest
import torch

from mlpe import sdk
from mlpe.common.settings import load
from mlpe.sdk import checkpoint


@pytest.fixture
def run(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    handler = signal.getsignal(signal.SIGTERM)
    settings = load({"MLPE_STATE_DIR": str(tmp_path / "state")})  # no job: unmanaged
    yield sdk.start(device="cpu", checkpoint_dir=tmp_path / "ckpt", every_steps=3,
                    settings=settings)
    signal.signal(signal.SIGTERM, handler)


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_unmanaged_identity_and_quiet_decisions(run):
    assert (run.managed, run.rank, run.world_size, run.job_id) == (False, 0, 1, "local")
    assert run.poll() == sdk.Decision()
    run.report(1, loss=2.5, tokens=128, grad_norm=1.0, anything=3.0)  # nowhere to send
    assert run.step == 1


def test_the_checkpoint_policy_and_a_round_trip(run, tmp_path):
    run.report(1, loss=1.0)
    assert not run.poll().checkpoint
    run.report(3, loss=1.0)
    assert run.poll().checkpoint  # every 3 steps
    model, optimizer = model_and_optimizer(0)
    stall = run.save(3, {"model": model, "optimizer": optimizer, "epoch": 7})
    assert stall >= 0 and not run.poll().checkpoint  # saved: not due again
    assert run.finish() == 0
    manifest = checkpoint.newest_good(tmp_path / "ckpt")[2]
    assert manifest["format"] == "torch" and "state.pt" in manifest["files"]

    fresh, fresh_optimizer = model_and_optimizer(1)
    state = {"model": fresh, "optimizer": fresh_optimizer, "epoch": 0}
    again = sdk.start(device="cpu", checkpoint_dir=tmp_path / "ckpt", settings=run.settings)
    assert again.load(state) == 3 and state["epoch"] == 7
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(KeyError, match="has no 'missing'"):
        again.load({"missing": 1})


def test_nothing_to_load_is_step_zero(run):
    assert run.load({"model": torch.nn.Linear(2, 2)}) == 0


def test_sigterm_is_a_preemption_decision_and_exit_code(run):
    os.kill(os.getpid(), signal.SIGTERM)
    decision = run.poll()
    assert decision.preempt and not decision.stop
    assert run.finish() == sdk.EXIT_PREEMPTED == 143


def test_a_pause_waits_for_the_checkpoint_in_flight(run, monkeypatch):
    """Paused means quiescent: a checkpoint saved asynchronously before the pause has
    landed when the run says it is paused (none appears while it is)."""
    from types import SimpleNamespace

    from mlpe.sdk import run as sdk_run

    waited = []
    run.savers["torch"] = SimpleNamespace(wait=lambda: waited.append("torch"))
    monkeypatch.setattr(run, "_control", lambda: (1, 0, 0))  # the controller says pause
    monkeypatch.setattr(sdk_run, "PAUSE_POLL_S", 0.0)
    assert run.poll().pause and waited == ["torch"] and run.paused


def test_a_pause_with_a_checkpoint_due_is_said_once_that_checkpoint_is_written(run,
                                                                              monkeypatch):
    """The loop every example runs saves when the decision says so, then skips the step
    when paused: a pause that comes with a due checkpoint must not say "paused" before
    that save (it landed in a paused job's folder, found flaky in a test of the
    controller)."""
    from mlpe.sdk import run as sdk_run

    said = []
    monkeypatch.setattr(run, "_control", lambda: (1, 0, 0))
    monkeypatch.setattr(run, "_progress", lambda **fields: said.append(fields.get("state")))
    monkeypatch.setattr(sdk_run, "PAUSE_POLL_S", 0.0)
    run.report(3, loss=1.0)  # every 3 steps: due
    said.clear()
    first = run.poll()
    assert first.pause and first.checkpoint and said == [] and not run.paused
    model, optimizer = model_and_optimizer(0)
    run.save(3, {"model": model, "optimizer": optimizer})
    second = run.poll()
    assert second.pause and not second.checkpoint and said == ["paused"] and run.paused
    assert checkpoint.newest_good(run.checkpoint_dir)[0] == 3  # written before "paused"


def test_a_pause_is_put_off_one_poll_at_most(run, monkeypatch):
    """A script that never saves is still paused, at the next poll."""
    from mlpe.sdk import run as sdk_run

    monkeypatch.setattr(run, "_control", lambda: (1, 0, 0))
    monkeypatch.setattr(sdk_run, "PAUSE_POLL_S", 0.0)
    run.report(3, loss=1.0)
    assert run.poll().checkpoint and not run.paused
    assert run.poll().pause and run.paused
