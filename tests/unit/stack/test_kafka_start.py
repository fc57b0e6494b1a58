"""The broker's start-up progress as `mlpe stack up` reads it from the log."""

from mlpe.stack.kafka import LOADED, LinesSeen


def test_lines_seen_counts_only_new_whole_lines(tmp_path):
    log = tmp_path / "kafka.log"
    log.write_bytes(b"INFO Completed load of Log(dir=a) before this start\n")
    seen = LinesSeen(log, LOADED)
    assert seen.count() == 0  # what was there before is not this start's progress
    with log.open("ab") as f:
        f.write(b"INFO Completed load of Log(dir=b)\nINFO other\nINFO Log loaded for part")
    assert seen.count() == 1  # the half-written line waits for its end
    with log.open("ab") as f:
        f.write(b"ition x-0\n")
    assert seen.count() == 2


def test_lines_seen_follows_a_rotated_log_and_a_missing_one(tmp_path):
    log = tmp_path / "kafka.log"
    seen = LinesSeen(log, LOADED)
    assert seen.count() == 0  # not there yet
    log.write_bytes(b"x" * 100 + b"\n")
    seen.count()
    log.write_bytes(b"Log loaded for partition a-0\n")  # a new, shorter file
    assert seen.count() == 1
