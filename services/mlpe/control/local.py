"""An `mlpe control` subprocess on this machine, in its own Redis namespace: what the
recovery benchmark, the tests and `mlpe run` drive."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import redis

from mlpe.common.grpc_server import wait_serving
from mlpe.common.jobs import JobKeys
from mlpe.common.process import free_port, pid_alive, stop_child
from mlpe.common.settings import environment
from mlpe.control.store import event_proto
from mlpe.v1 import control_pb2 as c
from mlpe.v1 import control_pb2_grpc

LIVE = (c.JOB_STATE_QUEUED, c.JOB_STATE_RUNNING, c.JOB_STATE_PAUSED)


class LocalController:
    def __init__(self, redis_url: str, kafka_bootstrap: str, workdir: Path, slots: int = 2,
                 extra_env: dict | None = None, namespace: str | None = None,
                 tls_ca: Path | None = None, standby: int = 1):
        self.namespace = namespace or f"local-{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.token = uuid.uuid4().hex
        self.auth = [("authorization", f"Bearer {self.token}"), ("mlpe-user", "local")]
        self.workdir = Path(workdir)
        self.jobs_dir = self.workdir / "jobs"
        self.log_path = self.workdir / f"control-{self.port}.log"
        self.keys = JobKeys(self.namespace)
        self.env = environment(
            MLPE_CONTROL_NAMESPACE=self.namespace, MLPE_CONTROL_TOKEN=self.token,
            MLPE_CONTROL_PORT=str(self.port), MLPE_REDIS_URL=redis_url,
            MLPE_KAFKA_BOOTSTRAP=kafka_bootstrap, MLPE_STATE_DIR=str(self.workdir / "state"),
            **(extra_env or {}))
        self.slots, self.standby = slots, standby
        self.redis = redis.Redis.from_url(redis_url)
        target = f"localhost:{self.port}" if tls_ca else f"127.0.0.1:{self.port}"
        self.channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(
            Path(tls_ca).read_bytes())) if tls_ca else grpc.insecure_channel(target))
        self.stub = control_pb2_grpc.TrainingControlStub(self.channel)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until its health service says SERVING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlpe.cli", "control", "--slots", str(self.slots),
                 "--standby", str(self.standby),
                 "--jobs-dir", str(self.jobs_dir), "--listen", f"127.0.0.1:{self.port}"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_serving(self.channel, self.proc, "mlpe control", timeout, self.log)

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the controller only (its workers keep running, as after a crash)."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """Cancel live jobs, kill any worker left, stop the controller, drop its keys."""
        with contextlib.suppress(grpc.RpcError):
            for job in self.stub.ListJobs(c.ListJobsRequest(), timeout=10).jobs:
                if job.state in LIVE:
                    with contextlib.suppress(grpc.RpcError):
                        self.stub.CancelJob(c.JobRequest(job_id=job.job_id),
                                            metadata=self.auth, timeout=10)
        for raw_id in self.redis.zrange(self.keys.jobs, 0, -1):
            job_id = raw_id.decode()
            launch = self.redis.hget(self.keys.job(job_id), "launch")
            pids = [json.loads(launch)] if launch else []
            pids += self.progress(job_id).values()  # torchrun gives each rank its own session
            for p in pids:
                if pid_alive(p.get("pid", 0), p.get("start_ticks")):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p["pid"], signal.SIGKILL)
        if self.proc is not None:
            stop_child(self.proc, timeout=30)
        self.channel.close()
        for key in self.redis.scan_iter(f"{self.namespace}:*"):
            self.redis.delete(key)

    # -- conveniences -----------------------------------------------------------------
    def submit(self, spec: c.JobSpec) -> c.Job:
        return self.stub.SubmitJob(c.SubmitJobRequest(spec=spec), metadata=self.auth)

    def job(self, job_id: str) -> c.Job:
        return self.stub.GetJob(c.JobRequest(job_id=job_id))

    def events(self, job_id: str, live: bool = True) -> list[c.JobEvent]:
        """The job's events: until it ends (StreamJobEvents), or only those so far."""
        if live:
            return list(self.stub.StreamJobEvents(c.StreamJobEventsRequest(job_id=job_id),
                                                  timeout=120))
        return [event_proto(job_id, i.decode(), {k.decode(): v.decode() for k, v in f.items()})
                for i, f in self.redis.xrange(self.keys.events(job_id))]

    def progress(self, job_id: str) -> dict[int, dict]:
        raw = self.redis.hgetall(self.keys.ranks(job_id))
        return {int(k): json.loads(v) for k, v in raw.items()}

    def wait(self, what: str, condition, timeout: float = 120.0, poll_s: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlpe control exited waiting for {what}\n{self.log()}")
            time.sleep(poll_s)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                           + self.log())

    def wait_state(self, job_id: str, state: int, timeout: float = 120.0) -> c.Job:
        def reached():
            job = self.job(job_id)
            if job.state == state:
                return job
            if job.state in (c.JOB_STATE_FAILED, c.JOB_STATE_CANCELLED) and job.state != state:
                raise RuntimeError(f"job {job_id} ended {c.JobState.Name(job.state)}: "
                                   f"{job.message}")
            return None
        return self.wait(f"{job_id} {c.JobState.Name(state)}", reached, timeout)

    def wait_step(self, job_id: str, rank: int, step: int, timeout: float = 120.0) -> dict:
        return self.wait(f"{job_id} rank {rank} at step {step}",
                         lambda: (p := self.progress(job_id).get(rank)) and
                         p.get("step", 0) >= step and p, timeout, poll_s=0.02)

    def checkpoint_state(self, job_id: str, step: int) -> dict:
        import torch

        folder = self.jobs_dir / job_id / "checkpoints" / f"step-{step:08d}"
        if (folder / "state.pt").exists():
            return torch.load(folder / "state.pt", weights_only=False)
        # A sharded job's (DCP): its shards gathered into one plain state dict.
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(folder, Path(tmp) / "state.pt")
            return torch.load(Path(tmp) / "state.pt", weights_only=False)
