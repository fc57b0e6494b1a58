"""Users' own training scripts under `mlpe control`, end to end on the real Redis, Kafka
(and, for the stream test, InfluxDB): the examples/ scripts on mlpe.sdk paused,
checkpointed on request, killed, fed a corrupt checkpoint, preempted and cancelled; a
killed run equal to the uninterrupted one; scripts that raise, hang, or do not use the
SDK; bad specs; the CLI; steps and kernel timings reaching InfluxDB and Kafka; the
job's pids published for the placement join."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from aiokafka import AIOKafkaConsumer

from mlpe.common.topics import PLACEMENT
from mlpe.control.local import LocalController
from mlpe.sdk import checkpoint
from mlpe.v1 import control_pb2 as c
from mlpe.v1.training_pb2 import JobPlacement
from tests.helpers import REPO_ROOT, flip_a_byte
from tests.integration.test_control import end_offsets, read_job_events
from tests.integration.test_stream import (  # noqa: F401 - stream_env: a fixture
    start_stream,
    stop,
    stream_env,
    wait_for,
)

EXAMPLES = REPO_ROOT / "examples"
SCRIPTS = Path(__file__).with_name("scripts")


class ScriptController(LocalController):
    """A started `mlpe control` whose allowed roots are examples/ and the test scripts."""

    def __init__(self, stack, tmp_path: Path, slots: int = 2):
        super().__init__(stack.redis_url, stack.kafka_bootstrap, tmp_path, slots, {
            "MLPE_CONTROL_SCRIPT_ROOTS": os.pathsep.join((str(EXAMPLES), str(SCRIPTS)))})
        self.start()

    def submit_script(self, script: Path, *args: str, env: dict | None = None,
                      **fields) -> c.Job:
        return self.submit(c.JobSpec(entrypoint=c.Entrypoint(
            script=str(script), args=list(args), env=env or {}), device="cpu", **fields))

    def state(self, job_id: str, step: int) -> dict:
        return self.checkpoint_state(job_id, step)

    def paused(self, job_id: str) -> dict:
        return self.wait("the ranks paused", lambda: all(
            p.get("state") == "paused" for p in self.progress(job_id).values()) and
            self.progress(job_id)[0])

    def restarted(self, job_id: str, old_pids: set[int]) -> dict:
        return self.wait("the restarted rank 0", lambda: (p := self.progress(job_id).get(0))
                         and p["pid"] not in old_pids and p.get("state") in
                         ("running", "paused") and p)


@pytest.fixture
def control(stack_endpoints, tmp_path):
    controller = ScriptController(stack_endpoints, tmp_path)
    yield controller
    controller.stop()


def _call(control, rpc: str, job_id: str) -> c.Job:
    return getattr(control.stub, rpc)(c.JobRequest(job_id=job_id), metadata=control.auth)


@pytest.mark.slow
def test_a_script_job_paused_checkpointed_killed_corrupted_preempted_cancelled(control):
    job = control.submit_script(EXAMPLES / "train_mlp.py", "--steps", "100000",
                                world_size=2, max_restarts=3,
                                checkpoint=c.CheckpointPolicy(every_steps=5, keep=5))
    control.wait_step(job.job_id, 0, 6)

    _call(control, "PauseJob", job.job_id)
    paused = control.paused(job.job_id)
    _call(control, "CheckpointNow", job.job_id)
    written = control.wait("the requested checkpoint",
                           lambda: control.job(job.job_id).checkpoint_step == paused["step"])
    assert written and control.progress(job.job_id)[0]["step"] == paused["step"]
    _call(control, "ResumeJob", job.job_id)
    control.wait_step(job.job_id, 0, paused["step"] + 3)

    # SIGKILL of rank 1: every rank restarts from the newest good checkpoint.
    folder = control.jobs_dir / job.job_id / "checkpoints"
    old = {p["pid"] for p in control.progress(job.job_id).values()}
    newest_at_kill = checkpoint.latest_good_step(folder)
    os.kill(control.progress(job.job_id)[1]["pid"], signal.SIGKILL)
    resumed = control.restarted(job.job_id, old)
    assert resumed["resumed_from"] >= newest_at_kill > 0
    assert control.job(job.job_id).restarts == 1

    # A flipped byte in the newest checkpoint: the previous one is used.
    _call(control, "PauseJob", job.job_id)
    control.paused(job.job_id)
    newest, previous = sorted(folder.glob("step-????????"))[-1:-3:-1]
    flip_a_byte(newest / "state.pt")
    old = {p["pid"] for p in control.progress(job.job_id).values()}
    os.kill(control.progress(job.job_id)[0]["pid"], signal.SIGKILL)
    resumed = control.restarted(job.job_id, old)
    assert resumed["resumed_from"] == int(previous.name.removeprefix("step-"))
    log = (control.jobs_dir / job.job_id / "logs" / "attempt-3" / "rank-0.log").read_text()
    assert f"{newest.name} refused" in log and "SHA-256" in log
    assert control.job(job.job_id).state == c.JOB_STATE_PAUSED  # still paused
    _call(control, "ResumeJob", job.job_id)
    control.wait_step(job.job_id, 0, resumed["step"] + 3)

    # SIGTERM (preemption): an emergency checkpoint of the very step, resumed from it.
    old = {p["pid"] for p in control.progress(job.job_id).values()}
    os.kill(control.progress(job.job_id)[0]["pid"], signal.SIGTERM)
    preempted = control.wait("the emergency checkpoint",
                             lambda: (p := control.progress(job.job_id).get(0)) and
                             p.get("state") == "preempted" and p)
    assert preempted["checkpoint_step"] == preempted["step"]
    resumed = control.restarted(job.job_id, old)
    assert resumed["resumed_from"] == preempted["step"]  # not one step lost
    restarts = [e.message for e in control.events(job.job_id, live=False)
                if e.kind == "restart"]
    assert len(restarts) == 3 and "preempted" in restarts[-1], restarts

    pids = [p["pid"] for p in control.progress(job.job_id).values()]
    assert _call(control, "CancelJob", job.job_id).state == c.JOB_STATE_CANCELLED
    control.wait("the ranks to stop", lambda: not any(Path(f"/proc/{p}").exists()
                                                       for p in pids))


@pytest.mark.slow  # two whole runs, one killed and resumed
def test_a_killed_script_job_ends_bitwise_equal_to_an_uninterrupted_one(control):
    spec = dict(world_size=2, max_restarts=1, checkpoint=c.CheckpointPolicy(every_steps=10))
    clean = control.submit_script(EXAMPLES / "train_mlp.py", "--steps", "40", **spec)
    control.wait_state(clean.job_id, c.JOB_STATE_COMPLETED)
    crashed = control.submit_script(EXAMPLES / "train_mlp.py", "--steps", "40", **spec)
    victim = control.wait_step(crashed.job_id, 1, 25)
    os.kill(victim["pid"], signal.SIGKILL)
    done = control.wait_state(crashed.job_id, c.JOB_STATE_COMPLETED)
    assert done.restarts == 1 and done.step == 40
    want, got = control.state(clean.job_id, 40), control.state(crashed.job_id, 40)
    for part in ("model", "rng"):
        a, b = want[part], got[part]
        pairs = [(a, b)] if isinstance(a, torch.Tensor) else [(a[k], b[k]) for k in a]
        assert all(torch.equal(x, y) for x, y in pairs), part
    moments = [(want["optimizer"]["state"][i][k], got["optimizer"]["state"][i][k])
               for i in want["optimizer"]["state"] for k in ("exp_avg", "exp_avg_sq")]
    assert all(torch.equal(x, y) for x, y in moments)


@pytest.mark.slow
def test_scripts_that_raise_hang_or_do_without_the_sdk(control):
    secret = "s3cret-value-4242"
    failing = control.submit_script(SCRIPTS / "raises.py", env={"WANDB_API_KEY": secret})
    hung = control.submit_script(SCRIPTS / "hangs_once.py", max_restarts=1,
                                 hang_timeout_s=3)

    failed = control.wait_state(failing.job_id, c.JOB_STATE_FAILED)
    assert "rank 0" in failed.message and "exited with code 1" in failed.message
    assert "ValueError: batch 7 has no labels" in failed.message
    assert secret not in failed.message and "token in use: ***" in failed.message
    assert failed.spec.entrypoint.env["WANDB_API_KEY"] == "***"  # GetJob needs no token

    done = control.wait_state(hung.job_id, c.JOB_STATE_COMPLETED)
    assert done.restarts == 1 and done.step == 10
    restart = next(e.message for e in control.events(hung.job_id) if e.kind == "restart")
    assert "made no progress" in restart and "hang_timeout_s 3" in restart

    plain = control.submit_script(SCRIPTS / "crashes_once.py", world_size=2,
                                  max_restarts=1, hang_timeout_s=2)
    control.wait_state(plain.job_id, c.JOB_STATE_RUNNING)
    with pytest.raises(grpc.RpcError) as err:
        _call(control, "PauseJob", plain.job_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "do not report through mlpe.sdk" in err.value.details()
    done = control.wait_state(plain.job_id, c.JOB_STATE_COMPLETED)
    assert done.restarts == 1 and done.message == "the script exited 0"
    events = control.events(plain.job_id)
    assert any(e.kind == "note" and "hang detection needs run.report()" in e.message
               for e in events)
    restart = next(e for e in events if e.kind == "restart")
    assert "exited with code 3" in restart.message and "giving up" in restart.message


def test_bad_script_specs_are_refused_naming_every_field(control):
    def refused(entrypoint: c.Entrypoint, **fields) -> str:
        with pytest.raises(grpc.RpcError) as err:
            control.stub.SubmitJob(c.SubmitJobRequest(spec=c.JobSpec(
                entrypoint=entrypoint, **fields)), metadata=control.auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return err.value.details()

    details = refused(c.Entrypoint(script="train.py", module="pkg.train", env={
        "RANK": "3", "1BAD": "x", "MLPE_JOB_ID": "mine"}, nproc_per_node=5),
        model=c.ModelSpec(preset="tiny"), micro_batch=4, world_size=2)
    for part in ("model: only for the built-in model", "micro_batch: only for",
                 "entrypoint: exactly one of script and module, got both",
                 "entrypoint.env: RANK is set by mlpe's launcher",
                 "entrypoint.env: '1BAD' is not a variable name",
                 "entrypoint.env: MLPE_JOB_ID is set", "entrypoint.nproc_per_node: this"):
        assert part in details, (part, details)

    assert "is not an absolute path" in refused(c.Entrypoint(script="train.py"))
    missing = SCRIPTS / "no-such-script.py"
    assert f"entrypoint.script: no file {missing}" in refused(
        c.Entrypoint(script=str(missing)))
    outside = REPO_ROOT / "tests" / "helpers.py"
    assert "outside the allowed roots" in refused(c.Entrypoint(script=str(outside)))
    assert "entrypoint.working_dir: no folder" in refused(c.Entrypoint(
        script=str(SCRIPTS / "raises.py"), working_dir=str(SCRIPTS / "nowhere")))
    assert "entrypoint.module: no module 'nosuchmodule'" in refused(c.Entrypoint(
        module="nosuchmodule.train", working_dir=str(SCRIPTS)))
    assert control.proc.poll() is None  # still serving


def test_a_script_job_from_the_cli(control):
    env = {**control.env, "MLPE_CONTROL_ADDRESS": f"127.0.0.1:{control.port}"}

    def jobs(*args):
        return subprocess.run([sys.executable, "-m", "mlpe.cli", "jobs", *args], env=env,
                              capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)

    done = jobs("submit", "--script", "examples/train_mlp.py", "--world-size", "2",
                "--device", "cpu", "--follow", "--", "--steps", "12", "--lr", "3e-4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "completed 12 steps" in done.stdout
    bad = jobs("submit", "--script", "examples/no_such.py")
    assert bad.returncode == 2 and "entrypoint.script: no file" in bad.stderr


@pytest.mark.xdist_group("stream-b")  # it starts `mlpe stream` (test_stream.py says why)
@pytest.mark.slow
def test_script_steps_reach_influxdb_and_kernel_timings_kafka(stream_env, unique,  # noqa: F811
                                                              tmp_path):
    e = stream_env
    stream = start_stream(unique, tmp_path / "stream.log")
    control = ScriptController(e, tmp_path)
    try:
        mark = end_offsets(e.kafka_bootstrap)
        job = control.submit_script(EXAMPLES / "train_lm.py", "--steps", "300",
                                    world_size=2, kernel_report_steps=5)
        control.wait_state(job.job_id, c.JOB_STATE_COMPLETED)
        steps, kernels = read_job_events(e.kafka_bootstrap, mark, job.job_id, 602, 120)
        assert sorted(s.step for s in steps if not s.halt and s.rank == 0) == \
            list(range(1, 301))
        assert {t.op for k in kernels for t in k.kernels} >= {"rmsnorm", "swiglu",
                                                              "linear_cross_entropy"}

        def train_points() -> int:
            with e.influx() as client:
                tables = client.query_api().query(f'''
                    from(bucket: "{e.bucket_of('1s')}") |> range(start: -1h)
                      |> filter(fn: (r) => r._measurement == "train" and
                                           r.job == "{job.job_id}")''')
            return sum(len(t.records) for t in tables)

        def kernel_ops() -> set[tuple[str, str]]:
            """(rank, op) of the job's `kernel` points with a bandwidth (bytes known)."""
            with e.influx() as client:
                tables = client.query_api().query(f'''
                    from(bucket: "{e.influx_bucket}") |> range(start: -1h)
                      |> filter(fn: (r) => r._measurement == "kernel" and
                                           r.job == "{job.job_id}" and r._field == "gbps")''')
            return {(r["rank"], r["op"]) for t in tables for r in t.records}

        async def wait():
            return (await wait_for(train_points, 90, "the job's train points", stream),
                    await wait_for(lambda: (lambda o: o if {(r, op) for r in ("0", "1") for
                                                            op in ("rmsnorm", "swiglu")} <= o
                                            else None)(kernel_ops()),
                                   90, "the job's kernel points", stream))
        trains, _ = asyncio.run(wait())
        assert trains > 0
    finally:
        control.stop()
        stop(stream)


def test_the_controller_publishes_which_pids_run_the_job(control, stack_endpoints):
    mark = end_offsets(stack_endpoints.kafka_bootstrap, (PLACEMENT,))
    job = control.submit_script(EXAMPLES / "train_mlp.py", "--steps", "20", world_size=2)
    control.wait_state(job.job_id, c.JOB_STATE_COMPLETED)
    ranks = json.loads((control.jobs_dir / job.job_id / "logs" / "attempt-1" /
                        "ranks.json").read_text())["ranks"]
    key = f"{socket.gethostname()}/{job.job_id}".encode()

    async def read() -> list[JobPlacement]:
        consumer = AIOKafkaConsumer(bootstrap_servers=stack_endpoints.kafka_bootstrap,
                                    enable_auto_commit=False)
        await consumer.start()
        consumer.assign(list(mark))
        for tp, offset in mark.items():
            consumer.seek(tp, offset)
        found: list[JobPlacement] = []
        try:
            async with asyncio.timeout(30):
                while not (found and found[-1].ended):
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        found += [JobPlacement.FromString(r.value) for r in records
                                  if r.key == key]
        finally:
            await consumer.stop()
        return found

    launched, ended = asyncio.run(read())
    assert {(r.rank, r.pid) for r in launched.ranks} == {
        (int(rank), p["pid"]) for rank, p in ranks.items()}
    assert launched.node_id == socket.gethostname() and not launched.ended
    assert ended.ended and not ended.ranks
