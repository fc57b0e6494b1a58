"""Fixtures for `mlpe run`'s summary and report tests (no server): the summary of the
canned run (run_inputs.py), synthetic series to plot, and the headless browser the
report is rendered in."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from run_inputs import FLEET, KILLED, STARTED, summary_of

from mlpe.run.report import GPU_FIELDS, ReportData, write_html_report
from tests.helpers import REPO_ROOT

INSTALL_CHROMIUM = REPO_ROOT / "tests" / "tools" / "install-chromium.sh"


@pytest.fixture(scope="session")
def summary() -> dict:
    return summary_of()


@pytest.fixture(scope="session")
def series() -> ReportData:
    """Two nodes of 8 GPUs for 60 s, two alerts; two ranks with a pause at the kill."""
    t0 = datetime.fromtimestamp(STARTED, UTC)
    seconds = [t0 + timedelta(seconds=i) for i in range(60)]
    gpus = {name: {(f"{FLEET}-{node:02d}", str(gpu)): (seconds, [
        40.0 + 10 * node + gpu + (i % 7) for i in range(60)])
        for node in range(2) for gpu in range(8)} for name in GPU_FIELDS}
    steps = seconds[:25] + seconds[35:]  # rank 1 killed at 30 s, back at 35 s
    train = {name: {rank: (steps, [5.0 - 0.01 * i + int(rank) for i in range(len(steps))])
                    for rank in ("0", "1")}
             for name in ("loss_mean", "tokens_per_s_mean", "step_time_s_mean")}
    return ReportData(gpus=gpus, alerts=[seconds[27], seconds[41]], train=train,
                      killed=datetime.fromtimestamp(KILLED, UTC))


@pytest.fixture(scope="session")
def report(tmp_path_factory, summary, series) -> tuple[Path, dict]:
    """The report of the canned run, written once (drawing takes seconds); and what
    writing it returned: how many series each plot drew."""
    path = tmp_path_factory.mktemp("run") / "report.html"
    return path, write_html_report(path, summary, series)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium: on PATH, or unpacked into the per-user cache by
    tests/tools/install-chromium.sh (which this runs: idempotent, seconds once cached)."""
    if os.environ.get("MLPE_TEST_NO_BROWSER") == "1":
        pytest.skip("MLPE_TEST_NO_BROWSER=1: the headless-browser check is switched off")
    try:
        done = subprocess.run(["bash", str(INSTALL_CHROMIUM)], capture_output=True,
                              text=True, timeout=540)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{INSTALL_CHROMIUM.name} took over 540 s")
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"no Chromium for the report check ({INSTALL_CHROMIUM.name}): {last}; "
                    "set MLPE_TEST_NO_BROWSER=1 to skip it")
    return done.stdout.strip().splitlines()[-1]
