"""Launches jobs with torchrun, watches them, restarts them from their last checkpoint.

Every tick (0.25 s): each launched job's workers are checked — the torchrun process and
every rank's pid alive, every rank's last step recent enough (hang watch) — and its
progress copied into the job record and the event log; then queued jobs start in
priority order while slots (one per rank) are free. A crashed or hung job has its whole
process group killed and is launched again (all ranks, from the newest good checkpoint)
until max_restarts is spent; each restart is an event and an alert.

Launch facts (pid and its /proc start time) are kept in Redis, so a restarted
controller re-attaches to workers that are still running, or restarts them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlpe.common.process import pid_alive, signal_group, start_ticks
from mlpe.control.store import (
    CANCELLED,
    COMPLETED,
    ENDED,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    JobStore,
    TransitionError,
)

log = logging.getLogger("mlpe.control")
TICK_S = 0.25
STARTUP_GRACE_S = 60.0    # before a rank's first step: imports, rendezvous, checkpoint load
CANCEL_GRACE_S = 10.0     # a cancelled job's workers get this long to stop by themselves
STEP_EVENT_EVERY_S = 0.5  # step events in the log at most this often per job


class Supervisor:
    def __init__(self, store: JobStore, jobs_root: Path, slots: int, *, alerts=None,
                 python: str = sys.executable, env: dict | None = None):
        self.store, self.jobs_root, self.slots = store, Path(jobs_root), slots
        self.alerts = alerts              # async callable(job record, reason) or None
        self.python, self.env = python, env
        self.children: dict[str, subprocess.Popen] = {}
        self.active: dict[str, int] = {}  # job id -> ranks it holds
        self.last_step_event: dict[str, float] = {}
        self.cancelled_at: dict[str, float] = {}

    def free_slots(self) -> int:
        return self.slots - sum(self.active.values())

    # -- launching --------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_root / job_id

    async def launch(self, record: dict, reason: str) -> None:
        job_id, spec = record["job_id"], record["resolved"]
        job_dir = self.job_dir(job_id)
        (job_dir / "logs").mkdir(parents=True, exist_ok=True)
        (job_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        await self.store.clear_progress(job_id)
        await self.store.control(job_id, pause=int(record["state"] == PAUSED), stop=0)
        attempt = (record["launch"] or {}).get("attempt", 0) + 1
        cmd = [self.python, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={spec['world_size']}", "--max-restarts=0",
               "--monitor-interval=0.2", "-m", "mlpe.worker.main", "--job", job_id,
               "--job-dir", str(job_dir)]
        with open(job_dir / "logs" / f"attempt-{attempt}.log", "ab") as out:
            child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env,
                                     start_new_session=True)  # its own group: killable
        self.children[job_id] = child
        self.active[job_id] = spec["world_size"]
        launch = {"pid": child.pid, "start_ticks": start_ticks(child.pid),
                  "attempt": attempt, "launched_ns": time.time_ns()}
        fields = {"launch": launch}
        if not record["started_ns"]:
            fields["started_ns"] = time.time_ns()
        await self.store.update(job_id, **fields)
        if record["state"] == QUEUED:
            await self.store.move(job_id, RUNNING, reason)
        else:
            await self.store.event(job_id, "launch", state=record["state"], message=reason)
        log.info("job %s: launched attempt %d (pid %d): %s", job_id, attempt, child.pid,
                 reason)

    def _launcher_alive(self, job_id: str, launch: dict | None) -> bool:
        child = self.children.get(job_id)
        if child is not None:
            return child.poll() is None
        return bool(launch) and pid_alive(launch["pid"], launch.get("start_ticks"))

    async def kill(self, job_id: str, launch: dict | None, sig: int = signal.SIGKILL) -> None:
        """Signal torchrun's process group and every rank's: torchrun starts each worker
        in a session of its own, so killing torchrun alone would leave them running."""
        if launch and pid_alive(launch["pid"], launch.get("start_ticks")):
            signal_group(launch["pid"], sig)
        for p in (await self.store.progress(job_id)).values():
            if pid_alive(p.get("pid", 0), p.get("start_ticks")):
                signal_group(p["pid"], sig)
        child = self.children.get(job_id)
        if child is not None and sig == signal.SIGKILL:
            child.wait()

    def forget(self, job_id: str) -> None:
        self.children.pop(job_id, None)
        self.active.pop(job_id, None)
        self.last_step_event.pop(job_id, None)
        self.cancelled_at.pop(job_id, None)

    # -- startup ----------------------------------------------------------------------
    async def reattach(self) -> None:
        for job_id in await self.store.ids(limit=10_000):
            record = await self.store.get(job_id)
            if record is None or record["state"] not in (RUNNING, PAUSED):
                continue
            launch = record["launch"]
            if launch and pid_alive(launch["pid"], launch.get("start_ticks")):
                self.active[job_id] = record["resolved"]["world_size"]
                await self.store.event(job_id, "attach", state=record["state"],
                                       message=f"controller re-attached to pid "
                                       f"{launch['pid']}")
                log.info("job %s: re-attached to running workers (pid %d)", job_id,
                         launch["pid"])
            else:
                await self.failure(record, "the controller restarted and the job's workers "
                                   "were gone")

    # -- watching ---------------------------------------------------------------------
    async def tick(self) -> None:
        for job_id in list(self.active):
            record = await self.store.get(job_id)
            if record is None:
                self.forget(job_id)
                continue
            await self.watch(record)
        await self.schedule()

    async def schedule(self) -> None:
        for job_id in await self.store.queued():
            record = await self.store.get(job_id)
            if record is None or record["state"] != QUEUED:
                continue
            need = record["resolved"]["world_size"]
            if need > self.free_slots():
                return  # strict priority: nothing jumps the head of the queue
            await self.launch(record, f"launched on {need} slot(s)")

    async def watch(self, record: dict) -> None:
        job_id, launch = record["job_id"], record["launch"]
        progress = await self.store.progress(job_id)
        await self.sync_progress(record, progress)
        alive = self._launcher_alive(job_id, launch)
        if record["state"] == CANCELLED:
            first = self.cancelled_at.setdefault(job_id, time.monotonic())
            if alive and time.monotonic() - first > CANCEL_GRACE_S:
                await self.kill(job_id, launch)
            elif not alive:
                self.forget(job_id)
            return
        if record["state"] in ENDED:
            await self.kill(job_id, launch)
            self.forget(job_id)
            return
        rank0 = progress.get(0, {})
        if not alive:
            self.children.pop(job_id, None)
            if rank0.get("state") == "completed":
                self.forget(job_id)
                await self.store.move(job_id, COMPLETED, f"completed {rank0['step']} steps")
            else:
                states = ", ".join(f"rank {r}: {p.get('state')} at step {p.get('step')}"
                                   for r, p in sorted(progress.items())) or "no rank reported"
                await self.failure(record, f"workers exited ({states})")
            return
        for rank, p in sorted(progress.items()):
            if p.get("state") not in ("completed", "stopped", "preempted") and \
                    not pid_alive(p.get("pid", 0)):
                await self.failure(record, f"rank {rank} (pid {p.get('pid')}) died at step "
                                   f"{p.get('step')}")
                return
        if record["state"] == RUNNING:
            await self.check_hang(record, progress)

    async def check_hang(self, record: dict, progress: dict[int, dict]) -> None:
        spec, launch = record["resolved"], record["launch"]
        now = time.time_ns()
        for rank in range(spec["world_size"]):
            p = progress.get(rank)
            if p is None:
                silent = (now - launch["launched_ns"]) / 1e9 - STARTUP_GRACE_S
            elif p.get("state") == "starting":  # resumed, not stepping yet: the first
                # collective waits for every rank, which on a loaded machine takes a while
                silent = (now - p["time_ns"]) / 1e9 - STARTUP_GRACE_S
            else:
                silent = (now - p["time_ns"]) / 1e9
            if silent > spec["hang_timeout_s"]:
                await self.failure(record, f"rank {rank} made no progress for {silent:.0f} s "
                                   f"(hang_timeout_s {spec['hang_timeout_s']:g})")
                return

    async def sync_progress(self, record: dict, progress: dict[int, dict]) -> None:
        rank0 = progress.get(0)
        if not rank0:
            return
        job_id = record["job_id"]
        fields = {}
        if rank0.get("step", 0) != record["step"]:
            fields.update(step=rank0["step"], loss=rank0.get("loss", record["loss"]),
                          tokens_per_s=rank0.get("tokens_per_s", record["tokens_per_s"]))
            now = time.monotonic()
            if now - self.last_step_event.get(job_id, 0) >= STEP_EVENT_EVERY_S or \
                    rank0["step"] == record["resolved"]["steps"]:
                self.last_step_event[job_id] = now
                await self.store.event(job_id, "step", state=record["state"],
                                       step=rank0["step"], loss=rank0.get("loss", 0.0))
        if rank0.get("checkpoint_step", 0) > record["checkpoint_step"]:
            fields["checkpoint_step"] = rank0["checkpoint_step"]
            await self.store.event(job_id, "checkpoint", state=record["state"],
                                   step=rank0["checkpoint_step"],
                                   message=f"checkpoint of step {rank0['checkpoint_step']} "
                                   "written")
        if fields:
            await self.store.update(job_id, **fields)
            record.update(fields)

    async def failure(self, record: dict, reason: str) -> None:
        job_id = record["job_id"]
        await self.kill(job_id, record["launch"])
        self.children.pop(job_id, None)
        spec = record["resolved"]
        log.warning("job %s: %s", job_id, reason)
        if record["restarts"] < spec["max_restarts"]:
            restarts = record["restarts"] + 1
            await self.store.update(job_id, restarts=restarts)
            record["restarts"] = restarts
            await self.store.event(job_id, "restart", state=record["state"],
                                   step=record["step"],
                                   message=f"restart {restarts}/{spec['max_restarts']}: "
                                   f"{reason}")
            if self.alerts is not None:
                await self.alerts(record, reason)
            await self.launch(record, f"restart {restarts} from the last good checkpoint")
            return
        self.forget(job_id)
        with contextlib.suppress(TransitionError):
            await self.store.move(job_id, FAILED, f"{reason}; no restarts left "
                                  f"(max_restarts {spec['max_restarts']})")
        if self.alerts is not None:
            await self.alerts(record, f"{reason}; the job failed")

    # -- requests from the API -----------------------------------------------------------
    async def cancel(self, record: dict) -> None:
        await self.store.control(record["job_id"], stop=1, pause=0)
        if record["launch"] and record["job_id"] in self.active:
            self.cancelled_at[record["job_id"]] = time.monotonic()

    def detach(self) -> None:
        """Leave the workers running: a restarted controller re-attaches to them."""
        self.children.clear()


def default_slots() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return os.cpu_count() or 1
