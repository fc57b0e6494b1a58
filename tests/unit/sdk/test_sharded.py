"""Sharded state through mlpe.sdk: FSDP2 ranks save DCP checkpoints with our manifest;
they load into another world size (DCP reshards), and a flipped byte in a shard makes
the previous checkpoint the one used."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("sharded_job.py")


def job(ckpt: Path, out: Path, world: int, *extra: str) -> dict:
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}"] if world > 1 else [sys.executable])
    done = subprocess.run([*prefix, str(JOB), str(ckpt), str(out), *extra],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.slow
def test_sharded_checkpoints_reshard_and_fall_back(tmp_path):
    ckpt = tmp_path / "checkpoints"
    saved = job(ckpt, tmp_path / "saved.pt", 2, "train")
    newest = ckpt / "step-00000002"
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["format"] == "dcp" and manifest["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest["files"])
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())

    for world in (1, 3):  # fewer and more ranks than saved it
        loaded = job(ckpt, tmp_path / f"loaded-{world}.pt", world)
        assert loaded["step"] == 2 and loaded["note"] == "after step 2"
        assert equal(loaded["model"], saved["model"]), world
        assert equal(loaded["optimizer"]["state"], saved["optimizer"]["state"]), world

    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    previous = job(ckpt, tmp_path / "previous.pt", 2)
    assert previous["step"] == 1 and previous["note"] == "after step 1"
    assert not equal(previous["model"], saved["model"])
