"""Checkpoints that cannot be silently corrupt or half-written.

A checkpoint is a folder `step-00000120/` holding `state.pt` and `manifest.json` (the
step and the SHA-256 and size of every file). It is written under a temporary name,
every file and the folder fsynced, then renamed into place, so a crash mid-write
leaves a `.tmp` folder that loading ignores and the next save removes. Loading takes
the newest checkpoint whose manifest is present and whose every file matches it; a
mismatch or a missing file is logged with its reason and the previous one is used.

Saving is asynchronous: `save_async` copies the state to the CPU (the only part that
stalls training, measured and returned) and a background thread serialises, hashes,
writes and prunes to the last `keep`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("mlpe.worker.checkpoint")
MANIFEST = "manifest.json"
STATE = "state.pt"


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def to_cpu(state):
    """A deep copy of a state tree with every tensor cloned to the CPU (what training
    may then modify in place does not reach the checkpoint)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(to_cpu(v) for v in state)
    return state


def write(directory: Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write `state` (already on the CPU) as the checkpoint of `step`; keep the newest
    `keep`. Returns the checkpoint's folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / _name(step)
    tmp = directory / (_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    _write(tmp / STATE, data)
    manifest = {"step": step, "time_ns": time.time_ns(),
                "files": {STATE: {"sha256": hashlib.sha256(data).hexdigest(),
                                  "bytes": len(data)}}}
    _write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a restart): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(directory)
    prune(directory, keep)
    return final


def prune(directory: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints, and leftover temporary folders."""
    for leftover in Path(directory).glob("step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in sorted(Path(directory).glob("step-????????"))[:-keep or None]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> str | None:
    """None when the checkpoint at `path` is whole and matches its manifest, else why not."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (a partial checkpoint)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest: {err}"
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        data = file.read_bytes()
        if len(data) != want.get("bytes"):
            return f"{name} has {len(data)} bytes, the manifest says {want.get('bytes')}"
        digest = hashlib.sha256(data).hexdigest()
        if digest != want.get("sha256"):
            return f"{name} SHA-256 {digest[:12]}… does not match the manifest's " \
                   f"{str(want.get('sha256'))[:12]}…"
    return None


def load_latest(directory: Path) -> tuple[int, dict] | None:
    """(step, state) of the newest good checkpoint, or None when there is none."""
    for path in sorted(Path(directory).glob("step-????????"), reverse=True):
        reason = verify(path)
        if reason:
            log.warning("checkpoint %s refused: %s; trying the previous one", path, reason)
            continue
        step = json.loads((path / MANIFEST).read_text())["step"]
        return step, torch.load(path / STATE, map_location="cpu", weights_only=False)
    return None


def latest_good_step(directory: Path) -> int:
    """Step of the newest checkpoint that verifies; 0 when none does."""
    for path in sorted(Path(directory).glob("step-????????"), reverse=True):
        if verify(path) is None:
            return int(path.name.removeprefix("step-"))
    return 0


class AsyncCheckpointer:
    """One background writer: `save` returns after the CPU copy; a save requested while
    the previous is still being written waits for it (at most one in flight)."""

    def __init__(self, directory: Path, keep: int = 3):
        self.directory, self.keep = Path(directory), keep
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.last_written = 0

    def save(self, step: int, state: dict) -> float:
        """Start saving; returns the training stall in milliseconds (wait + CPU copy)."""
        t0 = time.perf_counter()
        self.wait()
        snapshot = to_cpu(state)
        self.thread = threading.Thread(target=self._write, args=(step, snapshot),
                                       name=f"checkpoint-{step}", daemon=True)
        self.thread.start()
        return (time.perf_counter() - t0) * 1e3

    def _write(self, step: int, snapshot: dict) -> None:
        try:
            write(self.directory, step, snapshot, self.keep)
            self.last_written = step
        except Exception as err:  # noqa: BLE001 - reported by wait(), in the training thread
            self.error = err

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"checkpoint write failed: {err}") from err
