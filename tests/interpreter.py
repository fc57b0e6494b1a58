"""Tests that must run under Triton's interpreter (TRITON_INTERPRET=1) live in folders named
`interpreted/` and run in a pytest of their own: Triton picks the interpreter when a kernel
module is first imported, so they cannot share a process with tests that import the
kernels normally. Nothing of mlpe is imported here (the kernel tests also run against
`pip install ./kernels` alone)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def collect_only_when_interpreting() -> list[str]:
    """An `interpreted/` folder's conftest sets collect_ignore_glob to this."""
    return [] if os.environ.get("TRITON_INTERPRET") == "1" else ["test_*.py"]


def run_interpreted(folder: Path, *pytest_args: str, timeout: float = 900,
                    **env: str) -> subprocess.CompletedProcess:
    """pytest over `folder` in a child process with Triton's interpreter on."""
    child_env = {**os.environ, "TRITON_INTERPRET": "1", "MLPE_KERNELS": "triton", **env}
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(folder), "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", "-p", "no:randomly", *pytest_args],
        env=child_env, capture_output=True, text=True, timeout=timeout)
