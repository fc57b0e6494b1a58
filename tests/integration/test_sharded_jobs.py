"""FSDP2 jobs, of the built-in GPT and of a Hugging Face Llama patched with mlpe.kernels,
pass the control tests DDP jobs pass (test_control.py): SIGKILL of a rank → a resume
bitwise equal to the run that never stopped, SIGTERM → an emergency checkpoint and no
step lost, a corrupt checkpoint shard → the previous good one. On CPU with gloo, two
ranks, checkpoints through the SDK's sharded path (DCP + our manifest)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from mlpe.control.local import LocalController
from mlpe.v1 import control_pb2 as c
from tests.helpers import flip_a_byte

pytestmark = pytest.mark.slow  # two-rank FSDP jobs killed and resumed, half a minute each

TINY_LLAMA = json.dumps({
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64})
MODELS = {
    "gpt-fsdp": (c.ModelSpec(preset="tiny"), "fsdp"),
    "llama-fsdp": (c.ModelSpec(hf_config=TINY_LLAMA, seq_len=32), "fsdp"),
    "llama-ddp": (c.ModelSpec(hf_config=TINY_LLAMA, seq_len=32), "ddp"),
}


class Controller(LocalController):
    def __init__(self, stack, tmp_path):
        super().__init__(stack.redis_url, stack.kafka_bootstrap, tmp_path, 2, standby=0)
        self.start()

    def submit_model(self, model: str, **fields) -> c.Job:
        spec, kind = MODELS[model]
        return self.submit(c.JobSpec(model=spec, parallelism=c.ParallelismSpec(kind=kind),
                                     global_batch=4, micro_batch=2, world_size=2,
                                     device="cpu", **fields))


@pytest.fixture
def control(stack_endpoints, tmp_path):
    controller = Controller(stack_endpoints, tmp_path)
    yield controller
    controller.stop()


def restarted(control, job_id: str, old_pids: set) -> dict:
    return control.wait("the restarted ranks", lambda: (p := control.progress(job_id).get(0))
                        and p["pid"] not in old_pids and p.get("state") not in
                        (None, "launching") and p)


@pytest.mark.parametrize("model", list(MODELS))
def test_sigkill_of_a_rank_resumes_bitwise(control, model):
    spec = {"steps": 24, "max_restarts": 2, "checkpoint": c.CheckpointPolicy(every_steps=8)}
    clean = control.submit_model(model, name="clean", **spec)
    control.wait_state(clean.job_id, c.JOB_STATE_COMPLETED)
    crashed = control.submit_model(model, name="crashed", **spec)
    victim = control.wait_step(crashed.job_id, 1, 10)
    os.kill(victim["pid"], signal.SIGKILL)
    done = control.wait_state(crashed.job_id, c.JOB_STATE_COMPLETED)
    assert done.restarts == 1 and done.step == 24
    folder = control.jobs_dir / crashed.job_id / "checkpoints" / "step-00000024"
    sharded = MODELS[model][1] == "fsdp"
    assert (folder / "__1_0.distcp").exists() == sharded  # one shard file per rank
    want = control.checkpoint_state(clean.job_id, 24)["model"]
    got = control.checkpoint_state(crashed.job_id, 24)["model"]
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# The refusal and the emergency checkpoint are the checkpointer's, whatever the model:
# each runs on one sharded model (the other one above), not both.
@pytest.mark.parametrize("model", ["llama-fsdp"])
def test_a_corrupt_shard_is_refused_and_the_previous_checkpoint_used(control, model):
    job = control.submit_model(model, steps=100_000, max_restarts=1,
                               checkpoint=c.CheckpointPolicy(every_steps=4, keep=5))
    control.wait("two checkpoints", lambda: control.job(job.job_id).checkpoint_step >= 8)
    control.stub.PauseJob(c.JobRequest(job_id=job.job_id), metadata=control.auth)
    control.wait("paused", lambda: control.progress(job.job_id)[0].get("state") == "paused")
    folder = control.jobs_dir / job.job_id / "checkpoints"
    newest, previous = sorted(folder.glob("step-????????"))[-1:-3:-1]
    flip_a_byte(newest / "__1_0.distcp")  # rank 1's shard
    old = {p["pid"] for p in control.progress(job.job_id).values()}
    os.kill(control.progress(job.job_id)[0]["pid"], signal.SIGKILL)
    resumed = restarted(control, job.job_id, old)
    assert resumed["resumed_from"] == int(previous.name.removeprefix("step-"))
    assert control.job(job.job_id).state == c.JOB_STATE_PAUSED  # still paused
    control.stub.CancelJob(c.JobRequest(job_id=job.job_id), metadata=control.auth)


@pytest.mark.parametrize("model", ["gpt-fsdp"])
def test_sigterm_takes_an_emergency_sharded_checkpoint_and_nothing_is_lost(control, model):
    job = control.submit_model(model, steps=100_000, max_restarts=1,
                               checkpoint=c.CheckpointPolicy(every_steps=100_000))
    worker = control.wait_step(job.job_id, 0, 5)
    old = {p["pid"] for p in control.progress(job.job_id).values()}
    os.kill(worker["pid"], signal.SIGTERM)  # what a preempting scheduler sends
    preempted = control.wait("the emergency checkpoint",
                             lambda: (p := control.progress(job.job_id).get(0)) and
                             p.get("state") == "preempted" and p)
    assert preempted["checkpoint_step"] == preempted["step"] >= 5
    resumed = restarted(control, job.job_id, old)
    assert resumed["resumed_from"] == preempted["step"]  # not one step lost
    control.stub.CancelJob(c.JobRequest(job_id=job.job_id), metadata=control.auth)
