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


def test_wait_until_waits_on_while_progress_grows(managed):
    """A server still loading (the count grows) is given time past `timeout`; once the
    count stops growing for `timeout`, the wait fails saying so."""
    counts = iter([1, 2, 3, 4, 5, 6, 7, 8])
    clock = {"polls": 0}

    def progress() -> int:
        clock["polls"] += 1
        return next(counts, 8)

    with pytest.raises(StackError, match=r"sleeper: not ready after \d+ s \(8 loaded, then "
                                         r"none for 0 s\)"):
        wait_until(lambda: False, name="sleeper", what="ready", timeout=0.3, poll=0.1,
                   log=managed.log, progress=progress, limit=60)
    # Eight growing polls (0.8 s) kept it going well past the 0.3 s timeout.
    assert clock["polls"] >= 10


def test_wait_until_stops_at_the_limit_however_it_progresses(managed):
    counts = iter(range(1, 10_000))
    heard: list[str] = []
    with pytest.raises(StackError, match=r"\(the limit; \d+ loaded and still going\)"):
        wait_until(lambda: False, name="sleeper", what="ready", timeout=0.3, poll=0.05,
                   log=managed.log, progress=lambda: next(counts), limit=0.6,
                   report=heard.append)
    assert heard == []  # reports come every 15 s: none in 0.6 s


def test_wait_until_returns_when_ready_while_loading(managed):
    polls = iter([False, False, True])
    wait_until(lambda: next(polls), name="sleeper", what="ready", timeout=5, poll=0.01,
               log=managed.log, progress=lambda: 1, limit=10)


def test_a_big_log_is_rotated_at_spawn(managed, monkeypatch):
    import mlpe.common.process as process

    monkeypatch.setattr(process, "LOG_ROTATE_BYTES", 10)
    managed.log.parent.mkdir(parents=True)
    managed.log.write_text("old run, a long log\n")
    proc = managed.spawn([sys.executable, "-c", "print('new', flush=True)"], version="1")
    proc.wait(timeout=10)
    assert managed.log.with_suffix(".log.1").read_text() == "old run, a long log\n"
    assert "old run" not in managed.log.read_text()
