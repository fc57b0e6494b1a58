"""What the stack's components share: their user-facing error, their status row, and the
readiness wait."""

from __future__ import annotations

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
