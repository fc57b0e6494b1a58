"""`mlpe run` (what `make run` calls), short: every part of the main job runs against the
real stack, the job is killed and recovers, and the report plots real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Tests that start `mlpe stream` go in two groups, each on one pytest worker: every
# stream worker reads all of mlpe.metrics.*, so many at once would each do the work of
# all (every test's fleet is a job of its own, so none judges another's GPUs).
pytestmark = pytest.mark.xdist_group("stream-a")


@pytest.mark.slow  # the whole main job, about a minute
def test_mlpe_run_end_to_end(stack_endpoints, tmp_path):
    report = tmp_path / "report.html"
    env = {**os.environ, "MLPE_INFLUX_TOKEN": stack_endpoints.influx_token}
    env.pop("SLACK_WEBHOOK_URL", None)  # the built-in sink, never a real Slack here
    env.pop("MLPE_SLACK_WEBHOOK_URL", None)
    done = subprocess.run([sys.executable, "-m", "mlpe.cli", "run", "--duration", "35",
                           "--steps", "120", "--report", str(report)], env=env,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["values_ingested"] > 16 * 100 * 30  # 16 GPUs at 100 Hz, > 30 s, ≥1 field
    assert summary["plan"]["best"], summary["plan"]
    job = summary["job"]
    assert (job["state"], job["steps"]) == ("completed", 120)
    assert job["restarts"] >= 1 and job["kill_to_first_step_s"] > 0
    assert 25 <= job["resumed_from"] <= job["killed_at_step"]
    # The thermal throttle (at 25 s) is the one fault inside 35 s; it is caught and sent.
    assert summary["fault_recall"] == 1.0 and summary["false_alarms"] == 0
    assert summary["alerts"] and summary["webhook_deliveries"] >= 1
    assert all(a["delay_s"] is not None for a in summary["alerts"])
    # The report's plots hold the fleet's 16 GPUs and both ranks, read from InfluxDB.
    drawn = summary["report_series"]
    assert drawn["util_mean"] == drawn["power_mean"] == drawn["temp_mean"] == 16
    assert drawn["loss_mean"] == drawn["tokens_per_s_mean"] == drawn["step_time_s_mean"] == 2
    assert drawn["alert_markers"] >= 1
    html = report.read_text()
    assert html.count("<img src='data:image/png;base64,") == 2
    assert "it was not running before" not in done.stdout  # the stack was up: it stays up
