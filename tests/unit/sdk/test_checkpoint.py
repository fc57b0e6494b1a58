"""Checkpoints: atomic, checksummed, the previous good one used when the newest is bad."""

import logging
import shutil

import torch

from mlpe.sdk import checkpoint


def _state(step):
    return {"step": step, "weights": torch.full((4, 4), float(step)), "nested": {"m": [1, 2]}}


def test_round_trip_and_keep_the_newest(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.write(tmp_path, step, _state(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030", "step-00000040"]
    step, state = checkpoint.load_latest(tmp_path)
    assert step == 40 and torch.equal(state["weights"], torch.full((4, 4), 40.0))
    assert state["nested"] == {"m": [1, 2]}


def test_one_flipped_byte_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    checkpoint.write(tmp_path, 10, _state(10))
    newest = checkpoint.write(tmp_path, 20, _state(20))
    data = bytearray((newest / checkpoint.STATE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (newest / checkpoint.STATE).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mlpe.sdk.checkpoint"):
        step, state = checkpoint.load_latest(tmp_path)
    assert step == 10 and state["step"] == 10
    assert "step-00000020 refused" in caplog.text and "SHA-256" in caplog.text
    assert checkpoint.latest_good_step(tmp_path) == 10


def test_partial_and_truncated_checkpoints_are_refused(tmp_path, caplog):
    checkpoint.write(tmp_path, 5, _state(5))
    partial = checkpoint.write(tmp_path, 6, _state(6))
    (partial / checkpoint.MANIFEST).unlink()        # crashed before the manifest
    truncated = checkpoint.write(tmp_path, 7, _state(7))
    with open(truncated / checkpoint.STATE, "r+b") as f:
        f.truncate(100)
    shutil.copytree(partial, tmp_path / "step-00000008.tmp")  # a crash mid-write
    with caplog.at_level(logging.WARNING, logger="mlpe.sdk.checkpoint"):
        assert checkpoint.load_latest(tmp_path)[0] == 5
    assert "no manifest" in caplog.text and "100 bytes" in caplog.text


def test_nothing_to_load(tmp_path):
    assert checkpoint.load_latest(tmp_path) is None
    assert checkpoint.latest_good_step(tmp_path) == 0


def test_async_save_copies_first_so_training_may_go_on(tmp_path):
    saver = checkpoint.AsyncCheckpointer(tmp_path, keep=3)
    weights = torch.zeros(1000)
    stall_ms = saver.save(1, {"weights": weights})
    weights += 1  # training continues while the write is in flight
    saver.wait()
    assert stall_ms >= 0 and saver.last_written == 1
    assert torch.equal(checkpoint.load_latest(tmp_path)[1]["weights"], torch.zeros(1000))


def test_a_failed_async_write_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    saver = checkpoint.AsyncCheckpointer(blocker)
    saver.save(1, {"x": torch.zeros(1)})
    try:
        saver.wait()
    except RuntimeError as err:
        assert "checkpoint write failed" in str(err)
    else:
        raise AssertionError("the failed write was not reported")
