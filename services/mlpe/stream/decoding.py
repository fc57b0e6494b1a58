"""The stream's inputs as checked values: metric batches, GPU-seconds reports, TrainSteps,
JobPlacements.

Pure functions, no Faust. Each parser raises (BatchError or ValueError) with a reason
fit for the dead-letter topic: an input that cannot be true is refused, not guessed at.
The GPU-seconds report is the stream's own format (closed 1 s GPU windows, sent to
its internal topic for the detectors), so both its writer and its reader are here.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass

import numpy as np

from mlpe.common import batches
from mlpe.stream.detectors import baseline, peers, training
from mlpe.stream.windows import TRAIN_KIND, Closed
from mlpe.v1 import metrics_pb2, training_pb2

EARLIEST_NS = 1_577_836_800 * 10**9  # 2020-01-01: anything older is a broken clock
SECOND_FIELDS = {*peers.FIELDS, *baseline.WATCHED, "mem_used", "mem_total"}  # detectors' input
# Identifiers that become InfluxDB tags and Slack text: a safe alphabet, bounded, so no
# value can add a line, a tag or a field, nor a mention or a link.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}")
UUID = re.compile(r"[A-Za-z0-9._:-]{0,96}")


@dataclass(frozen=True)
class Limits:
    """What a single message may hold (Settings: MLPE_STREAM_*)."""
    max_devices: int = 64
    max_samples: int = 6000
    max_world_size: int = 65536
    clock_tolerance_s: float = 10.0

    @classmethod
    def of(cls, settings) -> Limits:
        return cls(settings.stream_max_devices, settings.stream_max_samples,
                   settings.stream_max_world_size, settings.stream_clock_tolerance_s)


class ClockError(batches.BatchError):
    """Timestamps ahead of the worker's clock: the node's clock is off (an alert)."""

    def __init__(self, message: str, node: str, ahead_s: float):
        super().__init__(message)
        self.node, self.ahead_s = node, ahead_s


def identifier_problem(what: str, value: str) -> str | None:
    if IDENTIFIER.fullmatch(value):
        return None
    shown = value[:40]
    return (f"{what} {shown!r}{'...' if len(value) > 40 else ''} is not 1-128 characters "
            "of letters, digits and ._:@+/- starting with a letter or digit")


def validate(batch: batches.NodeBatch, limits: Limits = Limits(),
             now_ns: int | None = None) -> None:
    """Refuse what cannot be true or would cost other data; raises BatchError."""
    problems = [p for p in (identifier_problem("node_id", batch.node_id),
                            batch.job_id and identifier_problem("job_id", batch.job_id)) if p]
    if batch.devices > limits.max_devices:
        problems.append(f"{batch.devices} devices, more than {limits.max_devices} "
                        "(MLPE_STREAM_MAX_DEVICES)")
    if batch.samples > limits.max_samples:
        problems.append(f"{batch.samples} samples per device, more than "
                        f"{limits.max_samples} (MLPE_STREAM_MAX_SAMPLES)")
    if batch.devices and (batch.device_indices.min() < 0 or
                          batch.device_indices.max() >= limits.max_devices):
        problems.append(f"device indices {batch.device_indices.tolist()[:8]} are not all in "
                        f"0..{limits.max_devices - 1}")
    bad_uuid = next((u for u in batch.device_uuids if not UUID.fullmatch(u)), None)
    if bad_uuid is not None:
        problems.append(f"device uuid {bad_uuid[:40]!r} is not up to 96 letters, digits "
                        "and ._:-")
    if problems:
        raise batches.BatchError("MetricBatch: " + "; ".join(problems))
    if batch.samples:
        first, last = int(batch.timestamps_ns.min()), int(batch.timestamps_ns.max())
        now_ns = time.time_ns() if now_ns is None else now_ns
        if first < EARLIEST_NS:
            raise batches.BatchError(
                f"MetricBatch: timestamps {first}..{last} ns are not a plausible time")
        ahead_s = (last - now_ns) / 1e9
        if ahead_s > limits.clock_tolerance_s:
            raise ClockError(
                f"MetricBatch: node {batch.node_id}'s samples are {ahead_s:.1f} s ahead of "
                f"this worker's clock (tolerance {limits.clock_tolerance_s:g} s, "
                "MLPE_STREAM_CLOCK_TOLERANCE_S): its clock is off", batch.node_id, ahead_s)


def parse_batch(raw: bytes, limits: Limits = Limits(),
                now_ns: int | None = None) -> batches.NodeBatch:
    """A MetricBatch, decoded and checked; raises BatchError (ClockError for a clock
    that is ahead)."""
    batch = batches.decode(raw)
    validate(batch, limits, now_ns)
    return batch


def gpu_second_reports(closed: list[Closed]) -> list[tuple[str, dict]]:
    """Closed 1 s GPU windows as one report per (job, node, second): (job, report).
    Final windows only: a provisional one may grow yet (windows.py)."""
    reports: dict[tuple, dict] = {}
    for c in closed:
        if not c.final or c.kind != metrics_pb2.DEVICE_KIND_GPU or \
                c.end_ns - c.start_ns != 10**9:
            continue
        for device in c.devices:
            report = reports.setdefault((device.job, c.node, c.start_ns), {
                "job": device.job, "node": c.node, "start_ns": c.start_ns, "gpus": {}})
            report["gpus"][str(device.index)] = {
                k: (v if math.isfinite(v) else None)
                for k, v in device.means.items() if k in SECOND_FIELDS}
    return [(job, report) for (job, _, _), report in reports.items()]


def parse_report(raw: bytes) -> dict:
    """A report of `gpu_second_reports`, checked; raises ValueError."""
    try:
        report = json.loads(raw)
        node, start, gpus = report["node"], int(report["start_ns"]), report["gpus"]
        if not isinstance(node, str) or not node or not isinstance(gpus, dict):
            raise TypeError("node must be a non-empty string and gpus a mapping")
        for gpu, values in gpus.items():
            if not gpu.isdigit() or len(gpu) > 4:
                raise TypeError(f"GPU {gpu[:40]!r} is not a GPU index")
            if not isinstance(values, dict) or not all(
                    isinstance(k, str) and len(k) <= 64 and (v is None or (
                        isinstance(v, int | float) and not isinstance(v, bool)))
                    for k, v in values.items()):
                raise TypeError("each GPU's values must be a mapping of names to numbers")
        job = report.get("job") or ""
        if not isinstance(job, str):
            raise TypeError("job must be a string")
        problem = identifier_problem("node", node) or (job and identifier_problem("job", job))
        if problem:
            raise TypeError(problem)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not a GPU-seconds report: {type(err).__name__}: {err}") from None
    report["start_ns"], report["job"] = start, job
    return report


def parse_step(raw: bytes, limits: Limits = Limits(),
               now_ns: int | None = None) -> training_pb2.TrainStep:
    """A TrainStep, checked; the loss may be NaN or inf (that is what we watch for)."""
    try:
        msg = training_pb2.TrainStep.FromString(raw)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
        raise ValueError(f"not a TrainStep: {err}") from None
    problems = []
    if not msg.job_id:
        problems.append("job_id is empty")
    elif (problem := identifier_problem("job_id", msg.job_id)) is not None:
        problems.append(problem)
    if msg.world_size > limits.max_world_size:
        problems.append(f"world_size {msg.world_size} is more than {limits.max_world_size} "
                        "(MLPE_STREAM_MAX_WORLD_SIZE)")
    elif msg.rank < 0 or msg.world_size < 1 or msg.rank >= msg.world_size:
        problems.append(f"rank {msg.rank} does not fit world_size {msg.world_size}")
    if msg.halt and msg.halt not in training.HALTS:
        problems.append(f"halt {msg.halt!r} is not one of {', '.join(training.HALTS)}")
    if msg.step < (0 if msg.halt else 1):  # a rank may halt before its first step
        problems.append(f"step {msg.step} is not {0 if msg.halt else 1} or more")
    now_ns = time.time_ns() if now_ns is None else now_ns
    if not EARLIEST_NS <= msg.time_ns <= now_ns + limits.clock_tolerance_s * 1e9:
        problems.append(f"time_ns {msg.time_ns} is not a plausible time (before 2020, or "
                        f"more than {limits.clock_tolerance_s:g} s ahead of this worker's "
                        "clock)")
    for name in () if msg.halt else ("tokens_per_s", "step_time_s"):
        value = getattr(msg, name)
        if not math.isfinite(value) or value < 0:
            problems.append(f"{name} {value} is not a finite number >= 0")
    if problems:
        raise ValueError("TrainStep: " + "; ".join(problems))
    return msg


def parse_placement(key: bytes | None, raw: bytes) -> training_pb2.JobPlacement:
    """A JobPlacement, checked; raises ValueError. Its key must be "<node id>/<job id>":
    compaction keeps the latest value per key, so an ended placement under another key
    would never replace its launch."""
    try:
        msg = training_pb2.JobPlacement.FromString(raw)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
        raise ValueError(f"not a JobPlacement: {err}") from None
    problems = []
    if not msg.job_id or not msg.node_id:
        problems.append("job_id and node_id must not be empty")
    elif key is not None and key != f"{msg.node_id}/{msg.job_id}".encode():
        problems.append(f"key {key.decode(errors='replace')!r} is not "
                        f"'{msg.node_id}/{msg.job_id}'")
    if not msg.ended and not msg.ranks:
        problems.append("no ranks and not ended")
    pids = [rank.pid for rank in msg.ranks]
    if any(pid <= 0 for pid in pids):
        problems.append(f"pids {pids} are not all positive")
    elif len(set(pids)) != len(pids):
        problems.append(f"pids {pids} repeat")
    if problems:
        raise ValueError("JobPlacement: " + "; ".join(problems))
    return msg


def parse_inventory(raw: bytes, limits: Limits = Limits()) -> metrics_pb2.NodeInventory:
    """A NodeInventory, checked (its node id a plain name, its GPUs within the limit);
    raises ValueError."""
    try:
        msg = metrics_pb2.NodeInventory.FromString(raw)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
        raise ValueError(f"not a NodeInventory: {err}") from None
    problem = identifier_problem("node_id", msg.node_id)
    if problem:
        raise ValueError(f"NodeInventory: {problem}")
    if len(msg.gpus) > limits.max_devices:
        raise ValueError(f"NodeInventory: {len(msg.gpus)} GPUs, more than "
                         f"MLPE_STREAM_MAX_DEVICES={limits.max_devices}")
    if any(not 0 <= g.index < limits.max_devices for g in msg.gpus):
        raise ValueError(f"NodeInventory: GPU indices {[g.index for g in msg.gpus]} are "
                         f"not all in 0..{limits.max_devices - 1}")
    return msg


class StepRow:
    """One TrainStep as a one-sample batch of a "device" (job, rank) for WindowSet."""
    FIELDS = ("loss", "tokens_per_s", "step_time_s", "grad_norm", "mem_allocated_gib")

    def __init__(self, msg: training_pb2.TrainStep):
        self.node_id, self.job_id = msg.job_id, msg.job_id
        self.device_kind = TRAIN_KIND
        self.device_indices = np.array([msg.rank])
        self.timestamps_ns = np.array([msg.time_ns], dtype=np.int64)
        self.samples = 1
        self._matrix = (self.FIELDS, np.array([[[msg.loss, msg.tokens_per_s, msg.step_time_s,
                                                 msg.grad_norm,
                                                 msg.mem_allocated_bytes / 2**30]]]))

    def job_of_device(self, d: int) -> str:
        return self.job_id

    def matrix(self):
        return self._matrix
