"""ManagedProcess with real child processes: start, recognise, stop, never stop a stranger."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlpe.common.process import ManagedProcess
from mlpe.stack.component import StackError, wait_until


@pytest.fixture
def managed(tmp_path):
    return ManagedProcess("sleeper", tmp_path / "run", tmp_path / "logs")


def test_spawn_record_stop(managed):
    proc = managed.spawn([sys.executable, "-c", "import time; print('hi', flush=True); "
                          "time.sleep(60)"], version="1.0")
    record = managed.record()
    assert record["pid"] == proc.pid and record["version"] == "1.0"
    assert managed.stop(timeout=5)
    assert proc.wait(timeout=5) is not None
    assert managed.record() is None and not managed.pidfile.exists()
    assert "mlpe stack up" in managed.log.read_text()


def test_stop_escalates_to_sigkill(managed):
    proc = managed.spawn([sys.executable, "-c", "import signal, time; "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('ready', flush=True); time.sleep(60)"], version="1")
    wait_until(lambda: "ready" in managed.log.read_text(), name="sleeper", what="ready",
               timeout=10, log=managed.log, proc=proc)
    assert managed.stop(timeout=0.5)
    # It ignores SIGTERM, so only the SIGKILL after the timeout can have ended it.
    assert not Path(f"/proc/{proc.pid}").exists()


def test_recycled_pid_is_not_ours(managed):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        managed.pidfile.parent.mkdir(parents=True)
        managed.pidfile.write_text(json.dumps({"pid": stranger.pid, "start_ticks": 1,
                                               "version": "x"}))
        assert managed.record() is None
        assert managed.stop() is False  # never signals a process it did not start
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_garbage_pidfile_means_not_running(managed):
    managed.pidfile.parent.mkdir(parents=True)
    managed.pidfile.write_text("{not json")
    assert managed.record() is None
    assert managed.stop() is False


def test_wait_until_reports_an_early_exit_with_the_log(managed):
    proc = managed.spawn([sys.executable, "-c", "raise SystemExit(7)"], version="1")
    with pytest.raises(StackError) as err:
        wait_until(lambda: False, name="sleeper", what="ready", timeout=30,
                   log=managed.log, proc=proc)
    assert "sleeper: exited with code 7" in str(err.value)
    assert str(managed.log) in str(err.value)


def test_wait_until_times_out_naming_what(managed):
    with pytest.raises(StackError, match=r"sleeper: not answering after 0 s"):
        wait_until(lambda: False, name="sleeper", what="answering", timeout=0.3,
                   log=managed.log)
