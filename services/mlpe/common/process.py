"""Processes mlpe starts and stops: pid files, liveness, signals, ports.

A managed process's pid file (JSON) records the pid, the version and the process's
start time (from /proc), so a recycled pid is never mistaken for ours and `stop` never
signals a process it did not start. The local stack's servers, the controller's
training ranks, the main job's services and the tests all use these.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_child(proc: subprocess.Popen, timeout: float = 20.0) -> int | None:
    """SIGTERM a child we started, SIGKILL it after `timeout`; its exit code."""
    stop_children([proc], timeout)
    return proc.returncode


def stop_children(procs, timeout: float = 20.0) -> None:
    """SIGTERM every child still running, then wait; SIGKILL what is left at `timeout`."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


LOG_ROTATE_BYTES = 64 << 20


class ManagedProcess:
    """The pid file and log of one component under the state directory."""

    def __init__(self, name: str, run_dir: Path, logs_dir: Path):
        self.name = name
        self.pidfile = run_dir / f"{name}.json"
        self.log = logs_dir / f"{name}.log"

    def record(self) -> dict | None:
        """The pid file's content if its process is alive and ours, else None."""
        try:
            record = json.loads(self.pidfile.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if start_ticks(pid) != record.get("start_ticks") or is_zombie(pid):
            return None
        return record

    def spawn(self, argv: list[str], *, version: str, env: dict | None = None) -> subprocess.Popen:
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        if self.log.exists() and self.log.stat().st_size > LOG_ROTATE_BYTES:
            self.log.replace(self.log.with_suffix(".log.1"))  # one old log kept, not forever
        with self.log.open("ab") as log:
            log.write(f"\n=== mlpe stack up: {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # survives the CLI; stopped by `down`
            )
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "pid": proc.pid, "start_ticks": start_ticks(proc.pid),
            "version": version, "started": time.time(),
        }))
        tmp.replace(self.pidfile)
        return proc

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM (then SIGKILL after `timeout`) our process; False if none was ours."""
        record = self.record()
        if record is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        pid = int(record["pid"])
        signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            signal_group(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)
        return True


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the component and anything it forked
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may contain spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22: start time since boot


def is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def pid_alive(pid: int, ticks: int | None = None) -> bool:
    """Is `pid` running, and (when `ticks` is given) still the process that started then?"""
    if not pid or not alive(pid):
        return False
    return ticks is None or start_ticks(pid) == ticks


def alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
    return Path(f"/proc/{pid}").exists() and not is_zombie(pid)
