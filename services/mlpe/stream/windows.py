"""Tumbling windows over columnar batches: min, mean, max, p95 and last per field.

Pure numpy and no Faust, so it is tested on its own. A window holds every device of
one source (a node's GPUs, its host, a training job's rank) and closes when the
event time seen from that source passes its end plus an allowed lateness (so a
replay after a crash recomputes exactly the same windows, and a node whose clock
jumps ahead closes only its own windows early), or when the source has been silent
for a while (a node that stopped sending still gets its last window written). Each
closed window becomes one InfluxDB point per device whose timestamp is the window
start: rewriting it on replay overwrites, never duplicates.

A window written because its source went silent is provisional: the rest of its
samples may still come (an agent that paused, a network hiccup), so it stays open,
keeps its tokens (its events are not acknowledged) and is written again, whole,
when more arrive; it becomes final when event time passes it or the silence lasts
`final_idle_s`. Releasing its events at the first write let a kill -9 commit past
a half-written window and the restarted worker, skipping the tail, never mend it.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from mlpe.common import batches
from mlpe.v1 import metrics_pb2 as pb

STATS = ("min", "mean", "max", "p95", "last")
# 1 s windows leave out p95: of 100 samples it is the 6th largest, next to max, and it
# was a fifth of every GPU's values per second (the InfluxDB write cost of the fleet).
# 10 s windows (1,000 samples) keep it, and the 1 min ones are made of those.
SECOND_STATS = ("min", "mean", "max", "last")
TRAIN_KIND = -1  # a "device" that is one rank of a training job (see decoding.StepRow)
MEASUREMENT = {pb.DEVICE_KIND_GPU: "gpu", pb.DEVICE_KIND_HOST: "host", TRAIN_KIND: "train"}


@dataclass
class _Window:
    start_ns: int
    # (times (S,), values (S, devices, fields)) per batch that joined
    parts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    fields: tuple[int | str, ...] = ()  # field numbers, or names for training rows
    tokens: list[object] = field(default_factory=list)  # whatever the caller acks afterwards
    jobs: list[str] = field(default_factory=list)  # per device
    seen: set[tuple[int, int, int]] = field(default_factory=set)  # (epoch, first time, n)
    written_parts: int = 0  # how many parts its last provisional write held


@dataclass(frozen=True)
class DeviceMeans:
    """One device of a closed window: its index, its job and the mean of each field."""
    index: int
    job: str
    means: dict[str, float]


@dataclass(frozen=True)
class Closed:
    """A finished window of one node (every device of one kind): its InfluxDB lines (one
    per device), the tokens whose data it held, and each device's means (what the
    detectors look at)."""
    lines: list[str]
    tokens: list[object]
    start_ns: int
    end_ns: int
    node: str = ""
    kind: int = 0
    devices: list[DeviceMeans] = field(default_factory=list)
    final: bool = True  # False: written while its source is silent; may grow yet
    source: tuple = ()  # its WindowSet key: (partition, node, kind, device indices)
    # What a longer window is made of (Rollup): the (devices, fields, STATS) table, the
    # finite samples of each (devices, fields), the field names, the samples and jobs.
    stats: np.ndarray | None = None
    counts: np.ndarray | None = None
    names: tuple[str, ...] = ()
    samples: int = 0
    jobs: tuple[str, ...] = ()
    seconds: int = 0  # whole seconds of the window that have samples (gpu_cost's GPU-time)


_TAG_ESCAPES = str.maketrans({"\\": "\\\\", ",": "\\,", "=": "\\=", " ": "\\ ",
                              "\n": "\\n", "\r": "\\r"})


def escape_tag(value: str) -> str:
    """A tag key or value for line protocol: commas, equals signs, spaces and backslashes
    escaped, and line breaks too, so no value can end the line or add a tag or field.
    (The stream also refuses identifiers outside a safe alphabet: decoding.py.)"""
    return value.translate(_TAG_ESCAPES)


class WindowSet:
    """All open windows of one width, keyed by source: (partition, node, kind, devices);
    a partition is any hashable, e.g. (topic, partition number). Event time is kept per
    source, so one source's clock never decides when another's windows close."""

    def __init__(self, width_s: float, lateness_s: float, idle_s: float,
                 final_idle_s: float | None = None):
        self.width_ns = int(width_s * 1e9)
        self.stats = SECOND_STATS if width_s == 1.0 else STATS
        self.label = f"{width_s:g}s"
        self.lateness_ns = int(lateness_s * 1e9)
        self.idle_s = idle_s
        self.final_idle_s = 5 * idle_s if final_idle_s is None else final_idle_s
        self.open: dict[tuple, dict[int, _Window]] = defaultdict(dict)
        self.watermark: dict = {}               # source -> max event time seen (ns)
        self.last_seen: dict = {}               # source -> monotonic time of its last batch
        self.late_samples = 0
        self.last_late = 0                      # of the last add(): samples dropped late
        self.skip_before: dict[tuple, int] = {}  # source -> first window start it may write
        self.partial_skipped = 0
        self.duplicate_samples = 0

    def add(self, partition: Hashable, batch, token: object) -> int:
        """Add a NodeBatch's (or a StepRow's) samples to their windows; `token` comes back
        with each window. Returns how many windows now hold some of it; `last_late`
        says how many of its samples came after their window was written."""
        joined = self.last_late = 0
        if not batch.samples:
            return joined
        if isinstance(batch, batches.Batch):  # one device (tests, tools)
            batch = batches.join([batch])
        key = (partition, batch.node_id, batch.device_kind, tuple(batch.device_indices.tolist()))
        fields, matrix = batch.matrix()
        times = batch.timestamps_ns
        starts = times - times % self.width_ns
        if key not in self.skip_before:
            # The first data of a source after a (re)start may begin mid-window: after a
            # crash the rest of that window was consumed (and written) before the last
            # commit. Never overwrite a window with such a tail: skip it. A first sample
            # less than one sampling interval after the window start is no tail: no
            # earlier sample of this source can lie in that window.
            first = int(starts[0])
            interval = int(np.median(np.diff(times))) if len(times) > 1 else 0
            begins = times[0] == first or int(times[0]) - first < interval
            self.skip_before[key] = first if begins else first + self.width_ns
        closed_before = self.watermark.get(key, -1) - self.lateness_ns
        # Nearly every batch lies inside one window: skip the masks then.
        groups = [(int(starts[0]), slice(None))] if starts[0] == starts[-1] else \
            [(int(s), starts == s) for s in np.unique(starts)]
        for start, rows in groups:
            if start < self.skip_before[key]:
                self.partial_skipped += len(times[rows])
                continue
            if start + self.width_ns <= closed_before and start not in self.open[key]:
                self.last_late += len(times[rows])  # that window is already written
                continue
            window = self.open[key].get(start)
            if window is None:
                window = self.open[key][start] = _Window(
                    start, fields=fields,
                    jobs=[batch.job_of_device(d) for d in range(len(key[3]))])
            elif not all(window.jobs):  # learned mid-window (placement.py: first event)
                window.jobs = [job or batch.job_of_device(d)
                               for d, job in enumerate(window.jobs)]
            # The same samples twice (a producer's resend, a redelivery after a
            # rebalance) must not count twice: at-least-once in, exactly-once out.
            part_times = times[rows]
            ident = (getattr(batch, "agent_epoch_ns", 0), int(part_times[0]), len(part_times))
            if ident in window.seen:
                self.duplicate_samples += len(part_times)
                continue
            window.seen.add(ident)
            window.parts.append((part_times, matrix[rows]))
            window.tokens.append(token)
            joined += 1
        self.late_samples += self.last_late
        self.watermark[key] = max(self.watermark.get(key, 0), int(times.max()))
        self.last_seen[key] = time.monotonic()
        return joined

    def drop_partitions(self, partitions: set) -> None:
        for table in (self.open, self.skip_before, self.watermark, self.last_seen):
            for key in [k for k in table if k[0] in partitions]:
                del table[key]

    def close_ready(self, now: float | None = None, flush_all: bool = False,
                    backlog=lambda partition: False) -> list[Closed]:
        """Windows whose end (plus lateness) their source's event time has passed (final),
        or whose source has been silent for idle_s with nothing left to read on its
        partition (provisional: see the module's doc; final after final_idle_s).
        `backlog` says whether unread data waits: a worker busy elsewhere must not mistake
        that for silence. All of them, final, with flush_all. A final window already
        written whole provisionally comes back without lines: only its tokens are news."""
        now = time.monotonic() if now is None else now
        out = []
        busy: dict = {}
        for key, windows in list(self.open.items()):
            partition = key[0]
            if partition not in busy:
                busy[partition] = backlog(partition)
            silent_s = 0.0 if busy[partition] else now - self.last_seen.get(key, now)
            horizon = self.watermark.get(key, 0) - self.lateness_ns
            for start in sorted(windows):
                window = windows[start]
                if flush_all or start + self.width_ns <= horizon or \
                        silent_s >= self.final_idle_s:
                    out.append(self._close(key, windows.pop(start)))
                elif silent_s >= self.idle_s and window.written_parts != len(window.parts):
                    window.written_parts = len(window.parts)
                    out.append(self._close(key, window, final=False))
            if not windows:
                del self.open[key]
        return out

    def _close(self, key: tuple, window: _Window, final: bool = True) -> Closed:
        _, node, kind, _ = key
        times = np.concatenate([t for t, _ in window.parts])
        values = np.concatenate([v for _, v in window.parts])  # (N, D, F)
        n, n_dev, n_fields = values.shape
        flat = values[np.argsort(times, kind="stable")].reshape(n, n_dev * n_fields)
        with np.errstate(all="ignore"):
            finite = np.isfinite(flat)
            if finite.all():  # the common case: plain reductions, no masks
                counts = np.full(flat.shape[1], n)
                columns = [_PLAIN[name](flat) for name in self.stats]
            else:
                counts = finite.sum(axis=0)
                masked = np.where(finite, flat, np.nan)  # inf is no reading either
                columns = [_MASKED[name](masked, counts) for name in self.stats]
            table = np.stack(columns, axis=-1).reshape(n_dev, n_fields, len(self.stats))
        counts = counts.reshape(n_dev, n_fields)
        names = tuple(f if isinstance(f, str) else batches.field_name(f) for f in window.fields)
        jobs = tuple(window.jobs[d] if d < len(window.jobs) else "" for d in range(n_dev))
        written_whole = final and window.written_parts == len(window.parts)
        lines, means = window_lines(self.label, key, names, table, counts, n, jobs,
                                    window.start_ns, with_lines=not written_whole,
                                    stats=self.stats)
        return Closed(lines=lines, tokens=window.tokens if final else [],
                      start_ns=window.start_ns, end_ns=window.start_ns + self.width_ns,
                      node=node, kind=kind, devices=means, final=final, source=key,
                      stats=table, counts=counts, names=names, samples=n, jobs=jobs,
                      seconds=int(np.unique(times // 10**9).size))


def window_lines(label: str, key: tuple, names: tuple[str, ...], table: np.ndarray,
           counts: np.ndarray, samples: int, jobs: tuple[str, ...], start_ns: int,
           with_lines: bool = True,
           stats: tuple[str, ...] = STATS) -> tuple[list[str], list[DeviceMeans]]:
    """A window's InfluxDB lines (one per device; none without with_lines) and each
    device's means, from its (devices, fields, stats) table. A field with no finite
    sample on a device is left out of that device's line."""
    _, node, kind, devices = key
    n_fields = len(names)
    # Python floats in one conversion; each line is one str.format of a template made
    # once per field set (repr of each float in C).
    means_of = table[:, :, stats.index("mean")].tolist()
    rows = table.tolist()
    complete = (counts > 0).all(axis=1).tolist()
    lines, means = [], []
    measurement = MEASUREMENT.get(kind, "device")
    for d, device in enumerate(devices):
        job = jobs[d]
        present = range(n_fields) if complete[d] else \
            [j for j in range(n_fields) if counts[d, j]]
        means.append(DeviceMeans(device, job, {names[j]: means_of[d][j] for j in present}))
        if not with_lines:
            continue
        chosen = names if complete[d] else tuple(names[j] for j in present)
        values = [x for j in present for x in rows[d][j]]
        parts = [_template(chosen, stats).format(*values)] if chosen else []
        parts.append(f"samples={samples}i")
        if kind == TRAIN_KIND:
            tags = f"job={escape_tag(node)},rank={device},window={label}"
        else:
            tags = f"node={escape_tag(node)},window={label}"
        if kind == pb.DEVICE_KIND_GPU:
            tags += f",gpu={device}"
            if job:  # the job view and AdviseJob select a job's GPUs by this tag
                tags += f",job={escape_tag(job)}"
        lines.append(f"{measurement},{tags} {','.join(parts)} {start_ns}")
    return lines, means


# Each stat over a window's (samples, columns): all finite, or NaN where there was no
# reading (with the count of readings per column).
_PLAIN = {"min": lambda a: a.min(axis=0), "mean": lambda a: a.mean(axis=0),
          "max": lambda a: a.max(axis=0), "p95": lambda a: _p95(a), "last": lambda a: a[-1]}
_MASKED = {
    "min": lambda a, counts: _nan_safe(np.nanmin, a, counts),
    "mean": lambda a, counts: _nan_safe(np.nanmean, a, counts),
    "max": lambda a, counts: _nan_safe(np.nanmax, a, counts),
    "p95": lambda a, counts: _nan_safe(
        lambda x, axis: np.nanpercentile(x, 95, axis=axis), a, counts),
    "last": lambda a, counts: _last_finite(a),
}


@functools.lru_cache(maxsize=256)
def _template(names: tuple[str, ...], stats: tuple[str, ...]) -> str:
    """Line-protocol fields for every stat of these fields: util_min={!r},util_mean=..."""
    return ",".join(f"{name}_{stat}={{!r}}" for name in names for stat in stats)


def _p95(values: np.ndarray) -> np.ndarray:
    """np.percentile(values, 95, axis=0) (linear interpolation) with one partition: the
    generic function's overhead was most of its cost on 100-sample windows."""
    rank = 0.95 * (len(values) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(values) - 1)
    part = np.partition(values, (lo, hi), axis=0)
    return part[lo] + (part[hi] - part[lo]) * (rank - lo)


def _nan_safe(fn, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    out = np.full(values.shape[1], np.nan)
    ok = counts > 0
    if ok.any():
        out[ok] = fn(values[:, ok], axis=0)
    return out


def _last_finite(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    idx = np.where(finite.any(axis=0), len(values) - 1 - np.argmax(finite[::-1], axis=0), 0)
    return values[idx, np.arange(values.shape[1])]
