"""Checkpoints that cannot be silently corrupt or half-written.

A checkpoint is a folder `step-00000120/` holding its data and `manifest.json` (the
step, the format, and the SHA-256 and size of every file). Two formats:

- "torch": one `state.pt` written by rank 0 (replicated state: DDP, one rank);
- "dcp": `torch.distributed.checkpoint` files, a shard per rank plus `.metadata`
  (sharded state: FSDP2 / DTensor), which DCP can load into another world size.
  DCP itself hashes nothing; the manifest adds that.

Either is written under a temporary name, every file and the folder fsynced, then
renamed into place (`seal`), so a crash mid-write leaves a `.tmp` folder that loading
ignores and the next save removes. Loading takes the newest checkpoint whose manifest
is present and whose every file matches it; a mismatch or a missing file is logged with
its reason and the previous one is used.

Saving is asynchronous: `AsyncCheckpointer.save` copies the state to the CPU (the only
part that stalls training, measured and returned) and a background thread serialises,
hashes, writes and prunes to the last `keep`.
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

log = logging.getLogger("mlpe.sdk.checkpoint")
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


def temporary(directory: Path, step: int) -> Path:
    """The folder a checkpoint of `step` is written into before `seal` renames it."""
    return Path(directory) / (_name(step) + ".tmp")


def _digest(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def seal(directory: Path, step: int, fmt: str, keep: int = 3, **extra) -> Path:
    """Hash every file of the written temporary folder into its manifest, fsync, rename
    it into place and keep the newest `keep`. Returns the checkpoint's folder."""
    directory = Path(directory)
    tmp, final = temporary(directory, step), directory / _name(step)
    files = {}
    for path in sorted(tmp.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            digest, size = _digest(path)
            files[path.name] = {"sha256": digest, "bytes": size}
            if fmt != "torch":  # DCP closes its files unsynced
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
    manifest = {"step": step, "format": fmt, "time_ns": time.time_ns(), "files": files,
                **extra}
    _write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a restart): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(directory)
    prune(directory, keep)
    return final


def write(directory: Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write `state` (already on the CPU) as the "torch" checkpoint of `step`; keep the
    newest `keep`. Returns the checkpoint's folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temporary(directory, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _write(tmp / STATE, buffer.getvalue())
    return seal(directory, step, "torch", keep)


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
    if not files:
        return "the manifest lists no files"
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want.get("bytes"):
            return (f"{name} has {file.stat().st_size} bytes, the manifest says "
                    f"{want.get('bytes')}")
        digest, _ = _digest(file)
        if digest != want.get("sha256"):
            return f"{name} SHA-256 {digest[:12]}… does not match the manifest's " \
                   f"{str(want.get('sha256'))[:12]}…"
    return None


def newest_good(directory: Path) -> tuple[int, Path, dict] | None:
    """(step, folder, manifest) of the newest checkpoint that verifies, or None; every
    one refused on the way is logged with its reason."""
    for path in sorted(Path(directory).glob("step-????????"), reverse=True):
        reason = verify(path)
        if reason:
            log.warning("checkpoint %s refused: %s; trying the previous one", path, reason)
            continue
        manifest = json.loads((path / MANIFEST).read_text())
        return int(manifest["step"]), path, manifest
    return None


def load_latest(directory: Path) -> tuple[int, dict] | None:
    """(step, state) of the newest good "torch" checkpoint, or None when there is none."""
    found = newest_good(directory)
    if found is None:
        return None
    step, path, manifest = found
    if manifest.get("format", "torch") != "torch":
        raise ValueError(f"{path} is a {manifest['format']!r} checkpoint: load it with "
                         "mlpe.sdk's Run.load, which knows the state to load it into")
    return step, torch.load(path / STATE, map_location="cpu", weights_only=False)


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


class ShardedCheckpointer(AsyncCheckpointer):
    """The same guarantees for sharded state through torch.distributed.checkpoint: every
    rank writes its own shards in the background (DCP's async_save, after staging them
    to the CPU) on `group`, a gloo group used for nothing else so the writer's
    collectives never interleave with training's; when they are all written, rank 0
    hashes the files into the manifest and renames the folder into place. Assumes the
    job's ranks share the checkpoint folder (one node, or a shared filesystem)."""

    def __init__(self, directory: Path, keep: int, rank: int, group):
        super().__init__(directory, keep)
        self.rank, self.group = rank, group

    def save(self, step: int, state: dict) -> float:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        self.wait()
        tmp = temporary(self.directory, step)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier(group=self.group)  # the folder exists (and is empty) for every rank
        future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
        self.thread = threading.Thread(target=self._seal, args=(step, future),
                                       name=f"checkpoint-{step}", daemon=True)
        self.thread.start()
        return (time.perf_counter() - t0) * 1e3

    def _seal(self, step: int, future) -> None:
        import torch.distributed as dist

        try:
            future.result()  # on rank 0: after every rank's shards and the metadata
            if self.rank == 0:
                seal(self.directory, step, "dcp", self.keep,
                     world_size=dist.get_world_size(self.group))
                self.last_written = step
        except Exception as err:  # noqa: BLE001 - reported by wait(), in the training thread
            self.error = err
