"""`python -m mlpe.worker.launch`: starts a job's ranks as torchrun does, from a process
that has already imported torch, and watches them.

`mlpe control` starts one ahead of need (a standby): it imports torch, torch.distributed
and mlpe.sdk — seconds on a small machine, the larger part of a restart — and then waits
for one job on stdin, a JSON line (`Job` below). It then forks the ranks, each with
torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, TORCHELASTIC_RUN_ID, …) and the job's (MLPE_JOB_ID, MLPE_JOB_DIR), and
runs the entry point in each as `python SCRIPT ARGS` or `python -m MODULE ARGS` would.
When a rank fails, the others are killed and the launcher exits with the failed rank's
code (torchrun with --max-restarts=0 does the same); the controller decides on restarts.
SIGTERM is passed on to every rank (preemption: they checkpoint and exit).

In the attempt's log folder: `launcher.log`, `rank-<r>.log` (each rank's stdout and
stderr), and `ranks.json` (every rank's pid and start ticks, then the failure if any).
The forked ranks never touch CUDA before the fork: the standby does not initialise it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib
import json
import os
import random
import runpy
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

EXIT_USAGE = 2
EXIT_PREEMPTED = 143    # a rank that checkpointed after SIGTERM (mlpe.sdk's finish())
PREEMPT_GRACE_S = 30.0  # its peers get this long to finish theirs before SIGKILL


@dataclasses.dataclass(frozen=True)
class Job:
    job_id: str
    job_dir: str
    log_dir: str
    nproc: int
    script: str = ""          # exactly one of script and module
    module: str = ""
    args: tuple[str, ...] = ()
    working_dir: str = ""
    env: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, line: str) -> Job:
        fields = json.loads(line)
        fields["args"] = tuple(fields.get("args", ()))
        return cls(**fields)


# What every rank imports anyway, imported once in the standby before the fork:
# torch.optim imports torch._dynamo on first use (1.5 s here), and the built-in model's
# job imports mlpe.worker.train (mlpe.kernels with it).
PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "torch.distributed.checkpoint",
           "mlpe.sdk", "mlpe.sdk.publish", "mlpe.worker.train")


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)


def _start_ticks(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(job: Job, rank: int, master_port: int) -> dict[str, str]:
    return {**os.environ, **job.env,
            "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
            "ROLE_RANK": str(rank), "WORLD_SIZE": str(job.nproc),
            "LOCAL_WORLD_SIZE": str(job.nproc), "ROLE_WORLD_SIZE": str(job.nproc),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
            "TORCHELASTIC_RUN_ID": job.job_id, "MLPE_JOB_ID": job.job_id,
            "MLPE_JOB_DIR": job.job_dir}


def _die_with_parent() -> None:
    """SIGKILL this rank when the launcher dies (ranks live in sessions of their own)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def run_rank(job: Job, rank: int, master_port: int) -> None:
    """In the forked child: become the rank and run the entry point. Never returns."""
    code = 1
    try:
        os.setsid()  # its own group: the controller kills a rank and its children at once
        _die_with_parent()
        if os.getppid() == 1:
            os._exit(1)
        fd = os.open(Path(job.log_dir) / f"rank-{rank}.log",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        env = rank_environment(job, rank, master_port)
        os.environ.clear()
        os.environ.update(env)
        random.seed()  # a fresh process would not share the standby's random state
        os.chdir(job.working_dir or Path(job.script).parent)
        if job.script:
            sys.argv = [job.script, *job.args]
            sys.path[0] = str(Path(job.script).parent)
            runpy.run_path(job.script, run_name="__main__")
        else:
            sys.argv = [job.module, *job.args]
            sys.path[0] = os.getcwd()
            runpy.run_module(job.module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = _exit_code(done.code)
    except BaseException:  # noqa: BLE001 - the script's error, for its log and the job
        traceback.print_exc()
        code = 1
    try:  # what a normal interpreter exit does: non-daemon threads, then atexit
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def launch(job: Job) -> int:
    log_dir = Path(job.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    master_port = _free_port()
    ranks: dict[int, int] = {}
    for rank in range(job.nproc):
        pid = os.fork()
        if pid == 0:
            run_rank(job, rank, master_port)
        ranks[rank] = pid
    record = {"ranks": {str(r): {"pid": p, "start_ticks": _start_ticks(p)}
                        for r, p in ranks.items()}, "master_port": master_port}
    _write_json(log_dir / "ranks.json", record)
    print(f"launched {job.nproc} rank(s) of {job.job_id}: "
          f"{', '.join(f'{r}={p}' for r, p in ranks.items())}", flush=True)

    def forward(signum, frame):
        for pid in ranks.values():
            _signal_group(pid, signum)
    signal.signal(signal.SIGTERM, forward)

    alive, failure, kill_at = {p: r for r, p in ranks.items()}, None, None
    while alive:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if kill_at is not None and time.monotonic() >= kill_at:
                for other in alive:
                    _signal_group(other, signal.SIGKILL)
                kill_at = None
            time.sleep(0.01)
            continue
        rank = alive.pop(pid, None)
        if rank is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and failure is None:
            failure = {"rank": rank, "pid": pid, "exit_code": code,
                       "signal": signal.Signals(-code).name if code < 0 else "",
                       "time_ns": time.time_ns()}
            preempted = code == EXIT_PREEMPTED
            print(f"rank {rank} (pid {pid}) "
                  f"{'was killed by ' + failure['signal'] if code < 0 else f'exited {code}'}"
                  f"; {'waiting for' if preempted else 'stopping'} the other ranks",
                  flush=True)
            # a preempted rank's peers are writing their emergency checkpoint too
            kill_at = time.monotonic() + (PREEMPT_GRACE_S if preempted else 0.0)
    if failure is None:
        print("every rank exited 0", flush=True)
        return 0
    _write_json(log_dir / "ranks.json", {**record, "failure": failure})
    code = failure["exit_code"]
    return 128 - code if code < 0 else code


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def main() -> int:
    preload()
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the controller went away (or has no job for this standby)
    try:
        job = Job.parse(line)
    except (ValueError, TypeError) as err:
        print(f"mlpe.worker.launch: bad job line: {err}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdin.close()
    log_dir = Path(job.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_dir / "launcher.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return launch(job)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # now: tearing down an interpreter with torch loaded takes a while
