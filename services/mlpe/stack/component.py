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
    progress: Callable[[], int] | None = None,
    limit: float | None = None,
    report: Callable[[str], None] | None = None,
) -> None:
    """Poll `ready()` until true; fail fast if `proc` exits, and at `timeout`.

    With `progress` (a count that grows while the server is still working, e.g. partition
    logs loaded) the `timeout` runs from the last time the count grew, up to `limit` in all:
    a broker loading thousands of partitions is slow, not stuck. `report` hears the count
    every 15 s meanwhile."""
    start = time.monotonic()
    deadline = start + timeout
    last_count, last_report = 0, start
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
        now = time.monotonic()
        if progress is not None:
            count = progress()
            if count > last_count:
                last_count = count
                deadline = min(now + timeout, start + (limit or timeout))
            if report is not None and count and now - last_report >= 15:
                report(f"{name}: still starting, {count} so far ({now - start:.0f} s)")
                last_report = now
        if now > deadline:
            waited = now - start if last_count else timeout
            why = ""
            if last_count and limit and waited >= limit:
                why = f" (the limit; {last_count} loaded and still going)"
            elif last_count:
                why = f" ({last_count} loaded, then none for {timeout:.0f} s)"
            raise StackError(f"{name}: not {what} after {waited:.0f} s{why}; see {log}")
        time.sleep(poll)
