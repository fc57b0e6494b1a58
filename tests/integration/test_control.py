"""mlpe control end to end: every RPC over gRPC against the real Redis and Kafka, with
real workers (torchrun's environment, CPU, gloo): crash recovery, hang detection, corrupt-checkpoint
fallback, controller restart, pause/resume, priority ordering, auth and bad input."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from aiokafka import AIOKafkaConsumer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mlpe.common.topics import ALERTS, KERNEL_EVENTS, TRAIN_EVENTS
from mlpe.control.local import LocalController
from mlpe.v1 import alerts_pb2, control_pb2_grpc, training_pb2
from mlpe.v1 import control_pb2 as c
from tests.helpers import parsed, tail

TINY = c.ModelSpec(preset="tiny")


class Controller(LocalController):
    """A started `mlpe control` on the test stack; jobs default to the tiny model. No
    standby launcher (each launch starts its own): on the test machine's two cores a
    standby per controller importing torch slows every other test; test_script_jobs.py
    and `mlpe bench recovery` run with one."""

    def __init__(self, stack, tmp_path: Path, slots: int = 2, extra_env: dict | None = None):
        super().__init__(stack.redis_url, stack.kafka_bootstrap, tmp_path, slots, extra_env,
                         standby=0)
        self.start()

    def submit(self, **fields) -> c.Job:
        return super().submit(c.JobSpec(model=TINY, global_batch=4, micro_batch=2, **fields))

    def final_weights(self, job_id: str, step: int) -> dict:
        return self.checkpoint_state(job_id, step)["model"]


def end_offsets(bootstrap: str, topics=(TRAIN_EVENTS, KERNEL_EVENTS)) -> dict:
    """Where the topics end now, per partition (read from here later)."""
    async def go():
        consumer = await tail(bootstrap, *topics)
        try:
            return {tp: await consumer.position(tp) for tp in consumer.assignment()}
        finally:
            await consumer.stop()
    return asyncio.run(go())


def read_job_events(bootstrap: str, mark: dict, job_id: str, n_steps: int, n_kernels: int):
    """(TrainSteps, KernelSummaries) of `job_id` published after `mark`."""
    async def go():
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        consumer.assign(list(mark))
        for tp, offset in mark.items():
            consumer.seek(tp, offset)
        steps, kernels = [], []
        try:
            async with asyncio.timeout(60):
                while len(steps) < n_steps or len(kernels) < n_kernels:
                    for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                        mine = [r for r in records if r.key == job_id.encode()]
                        if tp.topic == TRAIN_EVENTS.name:
                            steps += parsed(training_pb2.TrainStep, mine)
                        else:
                            kernels += parsed(training_pb2.KernelSummary, mine)
        finally:
            await consumer.stop()
        return steps, kernels
    return asyncio.run(go())


def read_from(bootstrap: str, mark: dict, message_type, keep, until, timeout: float = 30):
    """The `message_type` messages after `mark` that `keep(message)` accepts, read until
    `until(found)` (at most `timeout` s)."""
    async def go():
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        consumer.assign(list(mark))
        for tp, offset in mark.items():
            consumer.seek(tp, offset)
        found = []
        try:
            async with asyncio.timeout(timeout):
                while not until(found):
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        found += [m for m in parsed(message_type, records) if keep(m)]
        finally:
            await consumer.stop()
        return found
    return asyncio.run(go())


def read_alerts(bootstrap: str, mark: dict, job_id: str, rule: str, count: int = 1,
                label: tuple[str, str] | None = None) -> list[alerts_pb2.Alert]:
    """The `rule` alerts about `job_id` (or with `label`, a (key, value)) on mlpe.alerts
    after `mark` (waits for `count`). Only that rule: a stream worker of another test may
    watch the job's steps too, and rightly alert on, say, the throughput a restart cost."""
    return read_from(bootstrap, mark, alerts_pb2.Alert, lambda a: a.rule == rule and (
        a.labels.get(label[0]) == label[1] if label else a.labels.get("job") == job_id),
        lambda found: len(found) >= count)


@pytest.fixture
def control(stack_endpoints, tmp_path):
    controller = Controller(stack_endpoints, tmp_path)
    yield controller
    controller.stop()


def test_every_rpc_end_to_end_with_health_reflection_and_step_events(control,
                                                                      stack_endpoints):
    health = health_pb2_grpc.HealthStub(control.channel)
    served = health.Check(health_pb2.HealthCheckRequest(service="mlpe.v1.TrainingControl"))
    assert served.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(control.channel)
    answer = next(reflect.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "mlpe.v1.TrainingControl" in {s.name for s in answer.list_services_response.service}

    mark = end_offsets(stack_endpoints.kafka_bootstrap)
    job = control.submit(name="e2e", steps=30, checkpoint=c.CheckpointPolicy(every_steps=10),
                         kernel_report_steps=10)
    assert job.state == c.JOB_STATE_QUEUED and job.spec.name == "e2e"
    events = control.events(job.job_id)  # streams until the job ends
    states = [e.state for e in events if e.kind == "state"]
    assert states == [c.JOB_STATE_QUEUED, c.JOB_STATE_RUNNING, c.JOB_STATE_COMPLETED]
    assert [e.step for e in events if e.kind == "step"][-1] == 30
    seen = [e.step for e in events if e.kind == "checkpoint"]  # as the 0.25 s watch saw them
    assert seen == sorted(seen) and seen[-1] == 30
    folders = sorted(p.name for p in (control.jobs_dir / job.job_id / "checkpoints").iterdir())
    assert folders == ["step-00000010", "step-00000020", "step-00000030"]
    done = control.job(job.job_id)
    assert (done.state, done.step, done.checkpoint_step) == (c.JOB_STATE_COMPLETED, 30, 30)
    assert done.loss > 0 and done.tokens_per_s > 0 and done.ended_ns >= done.started_ns > 0
    listed = control.stub.ListJobs(c.ListJobsRequest(states=[c.JOB_STATE_COMPLETED])).jobs
    assert [j.job_id for j in listed] == [job.job_id]
    later = control.events(job.job_id)[-1]
    resumed = list(control.stub.StreamJobEvents(c.StreamJobEventsRequest(
        job_id=job.job_id, after_id=events[-2].id)))
    assert [e.id for e in resumed] == [later.id]

    # Step and kernel events reached Kafka, one TrainStep per step, then the rank's halt
    # (the stream's stall detector must not take a finished job's silence for a hang).
    steps, kernels = read_job_events(stack_endpoints.kafka_bootstrap, mark, job.job_id, 31, 3)
    assert sorted(s.step for s in steps if not s.halt) == list(range(1, 31))
    assert [(s.halt, s.step) for s in steps if s.halt] == [("completed", 30)]
    assert steps[-1].halt == "completed"
    assert {k.last_step for k in kernels} == {10, 20, 30}
    assert {t.op for k in kernels for t in k.kernels} >= {"rmsnorm", "swiglu", "adamw"}


def test_bad_input_and_access(control):
    with pytest.raises(grpc.RpcError) as err:
        control.stub.SubmitJob(c.SubmitJobRequest(spec=c.JobSpec(
            steps=0, world_size=3, model=c.ModelSpec(preset="nope", hidden=-5),
            precision="fp8")), metadata=control.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for field in ("steps:", "model.preset:", "model.hidden:", "precision:", "world_size:"):
        assert field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        control.stub.GetJob(c.JobRequest(job_id="job-missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        control.stub.SubmitJob(c.SubmitJobRequest(spec=c.JobSpec(steps=5)))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert control.token not in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        control.stub.CancelJob(c.JobRequest(job_id="x"),
                               metadata=[("authorization", "Bearer wrong")])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    job = control.submit(steps=100_000)
    control.stub.CancelJob(c.JobRequest(job_id=job.job_id), metadata=control.auth)
    with pytest.raises(grpc.RpcError) as err:
        control.stub.ResumeJob(c.JobRequest(job_id=job.job_id), metadata=control.auth)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cancelled" in err.value.details()
    audit = control.redis.xrange(f"{control.namespace}:audit")
    entries = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in audit]
    assert any(e["what"] == "SubmitJob" and e["outcome"].startswith("refused: no valid")
               for e in entries)
    assert any(e["what"] == "CancelJob" and e["job_id"] == job.job_id and
               e["who"].startswith("local@") and e["outcome"] == "ok: now cancelled"
               for e in entries)
    assert control.proc.poll() is None  # still serving after all of that


def test_pause_checkpoint_resume_cancel(control):
    job = control.submit(steps=100_000, checkpoint=c.CheckpointPolicy(every_steps=1000))
    control.wait_step(job.job_id, 0, 5)
    control.stub.PauseJob(c.JobRequest(job_id=job.job_id), metadata=control.auth)
    paused = control.wait("workers paused",
                          lambda: control.progress(job.job_id)[0].get("state") == "paused" and
                          control.progress(job.job_id)[0])
    control.stub.CheckpointNow(c.JobRequest(job_id=job.job_id), metadata=control.auth)
    written = control.wait("the requested checkpoint",
                           lambda: control.job(job.job_id).checkpoint_step)
    assert written == paused["step"]  # paused: the checkpoint holds exactly that step
    assert control.progress(job.job_id)[0]["step"] == paused["step"]
    control.stub.ResumeJob(c.JobRequest(job_id=job.job_id), metadata=control.auth)
    control.wait_step(job.job_id, 0, paused["step"] + 3)
    pid = control.progress(job.job_id)[0]["pid"]
    cancelled = control.stub.CancelJob(c.JobRequest(job_id=job.job_id), metadata=control.auth)
    assert cancelled.state == c.JOB_STATE_CANCELLED
    control.wait("the worker to stop", lambda: not Path(f"/proc/{pid}").exists())
    assert control.progress(job.job_id)[0]["state"] == "stopped"


@pytest.mark.slow  # two whole runs, one killed and resumed
def test_sigkill_of_a_rank_restarts_from_checkpoint_and_matches_an_uninterrupted_run(
        control, stack_endpoints):
    mark = end_offsets(stack_endpoints.kafka_bootstrap, (ALERTS,))
    spec = {"steps": 60, "world_size": 2, "max_restarts": 2,
            "checkpoint": c.CheckpointPolicy(every_steps=10)}
    clean = control.submit(name="clean", **spec)
    control.wait_state(clean.job_id, c.JOB_STATE_COMPLETED)
    crashed = control.submit(name="crashed", **spec)
    victim = control.wait_step(crashed.job_id, 1, 25)
    os.kill(victim["pid"], signal.SIGKILL)
    done = control.wait_state(crashed.job_id, c.JOB_STATE_COMPLETED)
    assert done.restarts == 1 and done.step == 60
    restarts = [e for e in control.events(crashed.job_id) if e.kind == "restart"]
    # The killed rank is named, by the launcher or by the watch of the ranks' pids.
    assert len(restarts) == 1 and ("rank 1" in restarts[0].message and (
        "killed by SIGKILL" in restarts[0].message or "died at step" in
        restarts[0].message)), restarts
    [alert] = read_alerts(stack_endpoints.kafka_bootstrap, mark, crashed.job_id,
                          "job_restarted")
    reason = restarts[0].message.split(": ", 1)[1].split("\n")[0]  # without the output tail
    assert reason in alert.explanation
    want, got = control.final_weights(clean.job_id, 60), control.final_weights(
        crashed.job_id, 60)
    assert all(torch.equal(want[k], got[k]) for k in want)  # bitwise the same run


def test_a_hung_rank_is_detected_and_the_job_restarted(stack_endpoints, tmp_path):
    control = Controller(stack_endpoints, tmp_path, extra_env={
        "MLPE_WORKER_FAULT": "hang@12:1"})
    try:
        # 8 s, not less: on two loaded cores a healthy rank was once seen silent for 3 s
        # after its restart (the job then failed with no restarts left).
        job = control.submit(steps=30, world_size=2, max_restarts=1, hang_timeout_s=8,
                             checkpoint=c.CheckpointPolicy(every_steps=5))
        done = control.wait_state(job.job_id, c.JOB_STATE_COMPLETED)
        assert done.restarts == 1
        restart = next(e for e in control.events(job.job_id) if e.kind == "restart")
        assert "made no progress" in restart.message and "hang_timeout_s 8" in restart.message
    finally:
        control.stop()


def test_a_corrupt_checkpoint_is_refused_and_the_previous_one_used(control):
    job = control.submit(steps=100_000, max_restarts=1,
                         checkpoint=c.CheckpointPolicy(every_steps=5, keep=5))
    control.wait("two checkpoints", lambda: control.job(job.job_id).checkpoint_step >= 10)
    control.stub.PauseJob(c.JobRequest(job_id=job.job_id), metadata=control.auth)
    control.wait("paused", lambda: control.progress(job.job_id)[0].get("state") == "paused")
    folder = control.jobs_dir / job.job_id / "checkpoints"
    newest, previous = sorted(folder.glob("step-????????"))[-1:-3:-1]
    data = bytearray((newest / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (newest / "state.pt").write_bytes(bytes(data))
    old = control.progress(job.job_id)[0]["pid"]
    os.kill(old, signal.SIGKILL)
    resumed = control.wait("the restarted worker",
                           lambda: (p := control.progress(job.job_id).get(0)) and
                           p["pid"] != old and p.get("state") != "launching" and p)
    assert resumed["resumed_from"] == int(previous.name.removeprefix("step-"))
    log = (control.jobs_dir / job.job_id / "logs" / "attempt-2" / "rank-0.log").read_text()
    assert f"{newest.name} refused" in log and "SHA-256" in log
    assert control.job(job.job_id).state == c.JOB_STATE_PAUSED  # still paused after restart


def test_controller_restart_reattaches_or_restarts_from_checkpoint(control):
    job = control.submit(steps=100_000, max_restarts=2,
                         checkpoint=c.CheckpointPolicy(every_steps=5))
    before = control.wait_step(job.job_id, 0, 5)
    control.kill()  # SIGKILL: the workers keep running
    control.start()
    control.wait_step(job.job_id, 0, before["step"] + 5)
    assert control.progress(job.job_id)[0]["pid"] == before["pid"]  # the same worker
    assert any(e.kind == "attach" for e in control.events(job.job_id, live=False))

    control.kill()  # and this time the workers die too (the launcher and every rank)
    os.killpg(json.loads(control.redis.hget(f"{control.namespace}:job:{job.job_id}",
                                            "launch"))["pid"], signal.SIGKILL)
    for rank in control.progress(job.job_id).values():
        os.killpg(rank["pid"], signal.SIGKILL)
    control.start()
    control.wait("a new worker", lambda: (p := control.progress(job.job_id).get(0)) and
                 p["pid"] != before["pid"] and p.get("resumed_from", 0) > 0)
    assert control.job(job.job_id).restarts == 1


def test_priority_queue_order(control):
    blocker = control.submit(name="blocker", steps=100_000, world_size=2)
    control.wait_state(blocker.job_id, c.JOB_STATE_RUNNING)
    low = control.submit(name="low", steps=100_000, priority=0)
    high = control.submit(name="high", steps=100_000, priority=5)
    mid = control.submit(name="mid", steps=100_000, priority=2)
    positions = {j.spec.name: j.queue_position for j in
                 control.stub.ListJobs(c.ListJobsRequest(states=[c.JOB_STATE_QUEUED])).jobs}
    assert positions == {"high": 1, "mid": 2, "low": 3}
    control.stub.CancelJob(c.JobRequest(job_id=blocker.job_id), metadata=control.auth)
    control.wait_state(high.job_id, c.JOB_STATE_RUNNING)
    control.wait_state(mid.job_id, c.JOB_STATE_RUNNING)
    assert control.job(low.job_id).state == c.JOB_STATE_QUEUED  # both slots taken
    assert control.job(low.job_id).queue_position == 1


def test_sigterm_takes_an_emergency_checkpoint_and_nothing_is_lost(control):
    job = control.submit(steps=100_000, max_restarts=1,
                         checkpoint=c.CheckpointPolicy(every_steps=100_000))
    worker = control.wait_step(job.job_id, 0, 5)
    os.kill(worker["pid"], signal.SIGTERM)  # what a preempting scheduler sends
    preempted = control.wait("the emergency checkpoint",
                             lambda: (p := control.progress(job.job_id).get(0)) and
                             p.get("state") == "preempted" and p)
    assert preempted["checkpoint_step"] == preempted["step"] >= 5
    resumed = control.wait("the restarted worker",
                           lambda: (p := control.progress(job.job_id).get(0)) and
                           p["pid"] != worker["pid"] and p.get("state") != "launching" and p)
    assert resumed["resumed_from"] == preempted["step"]  # not one step lost
    restart = next(e for e in control.events(job.job_id, live=False) if e.kind == "restart")
    assert "preempted" in restart.message


def test_tls_when_certificates_are_configured(stack_endpoints, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    control = LocalController(stack_endpoints.redis_url, stack_endpoints.kafka_bootstrap,
                              tmp_path, extra_env={"MLPE_CONTROL_TLS_CERT": str(cert),
                                                   "MLPE_CONTROL_TLS_KEY": str(key)},
                              tls_ca=cert, standby=0)
    control.start()  # its health check already goes over TLS
    try:
        assert control.stub.ListJobs(c.ListJobsRequest()).jobs == []
        plain = control_pb2_grpc.TrainingControlStub(
            grpc.insecure_channel(f"127.0.0.1:{control.port}"))
        with pytest.raises(grpc.RpcError) as err:
            plain.ListJobs(c.ListJobsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        control.stop()


def test_the_jobs_cli(control):
    env = {**control.env, "MLPE_CONTROL_ADDRESS": f"127.0.0.1:{control.port}"}

    def jobs(*args):
        return subprocess.run([sys.executable, "-m", "mlpe.cli", "jobs", *args], env=env,
                              capture_output=True, text=True, timeout=300)

    done = jobs("submit", "--preset", "tiny", "--steps", "12", "--global-batch", "2",
                "--micro-batch", "2", "--name", "cli", "--follow")
    assert done.returncode == 0, done.stderr
    assert "submitted job-" in done.stdout and "completed 12 steps" in done.stdout
    job_id = done.stdout.split()[1]
    status = jobs("status", job_id, "--json")
    assert json.loads(status.stdout)["state"] == "completed"
    listed = jobs("list")
    assert job_id in listed.stdout and "12/12" in listed.stdout
    missing = jobs("pause", "job-nope")
    assert missing.returncode == 4 and "NOT_FOUND" in missing.stderr
    bad = jobs("submit", "--steps", "0")
    assert bad.returncode == 2 and "steps: between 1" in bad.stderr
    unauthorised = subprocess.run(
        [sys.executable, "-m", "mlpe.cli", "jobs", "cancel", job_id],
        env={**env, "MLPE_CONTROL_TOKEN": "wrong"}, capture_output=True, text=True,
        timeout=60)
    assert unauthorised.returncode == 1 and "UNAUTHENTICATED" in unauthorised.stderr
