"""The main job's console: one status line that a terminal rewrites in place, and the
lines of news printed between its updates."""

from __future__ import annotations

import shutil
import sys


class StatusLine:
    """One compact status line: rewritten in place on a terminal, a line of its own
    otherwise (logs and CI keep every one, so callers show it less often there)."""

    def __init__(self, tty: bool | None = None):
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.shown = False  # a status line is on screen and not yet ended

    def show(self, line: str) -> None:
        if self.tty:
            sys.stdout.write("\r\x1b[2K" + line[:shutil.get_terminal_size().columns - 1])
            sys.stdout.flush()
            self.shown = True
        else:
            print(line, flush=True)

    def clear(self) -> None:
        """Erase a status line on screen, so that what is printed next starts clean."""
        if self.shown:
            sys.stdout.write("\r\x1b[2K")
            self.shown = False

    def say(self, *args, **kwargs) -> None:
        """print(), after erasing a status line."""
        self.clear()
        print(*args, **kwargs)
