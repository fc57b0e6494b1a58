"""Background processes that `mlpe stack up` starts and only `down` stops.

A component's pid file (JSON) records the pid, the version and the process's
start time (from /proc), so a recycled pid is never mistaken for ours and
`down` never signals a process it did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class StackError(RuntimeError):
    """A one-line, user-facing failure naming the component (and its log)."""


@dataclass
class Status:
    name: str
    state: str  # "up" or "down"
    version: str
    address: str
    detail: str  # "managed, pid 123", "external", or why it is down

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    ready: Callable[[], bool],
    *,
    name: str,
    what: str,
    timeout: float,
    log: Path,
    proc: subprocess.Popen | None = None,
    poll: float = 0.25,
) -> None:
    """Poll `ready()` until true; fail fast if `proc` exits, and at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise StackError(
                f"{name}: exited with code {proc.returncode} while starting; see {log}"
            )
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not ready yet; the timeout reports it
            pass
        if time.monotonic() > deadline:
            raise StackError(f"{name}: not {what} after {timeout:.0f} s; see {log}")
        time.sleep(poll)


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
        if _start_ticks(pid) != record.get("start_ticks") or _is_zombie(pid):
            return None
        return record

    def spawn(self, argv: list[str], *, version: str, env: dict | None = None) -> subprocess.Popen:
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
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
            "pid": proc.pid, "start_ticks": _start_ticks(proc.pid),
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
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)
        return True


def _signal(pid: int, sig: int) -> None:
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


def _start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22: start time since boot


def _is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)
