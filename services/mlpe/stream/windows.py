"""Tumbling windows over columnar batches: min, mean, max, p95 and last per field.

Pure numpy and no Faust, so it is tested on its own. A window closes when the
event time seen on its partition passes its end plus an allowed lateness (so a
replay after a crash recomputes exactly the same windows), or when the partition
has been silent for a while (a node that stopped sending still gets its last
window written). Each closed window becomes one InfluxDB point whose timestamp
is the window start: rewriting it on replay overwrites, never duplicates.

A window written because its partition went silent is provisional: the rest of its
samples may still come (an agent that paused, a network hiccup), so it stays open,
keeps its tokens (its events are not acknowledged) and is written again, whole,
when more arrive; it becomes final when event time passes it or the silence lasts
`final_idle_s`. Releasing its events at the first write let a kill -9 commit past
a half-written window and the restarted worker, skipping the tail, never mend it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from mlpe.common import batches
from mlpe.v1 import metrics_pb2 as pb

STATS = ("min", "mean", "max", "p95", "last")
TRAIN_KIND = -1  # a "device" that is one rank of a training job (see decoding.StepRow)
MEASUREMENT = {pb.DEVICE_KIND_GPU: "gpu", pb.DEVICE_KIND_HOST: "host", TRAIN_KIND: "train"}


@dataclass
class _Window:
    start_ns: int
    parts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (times, values)
    fields: tuple[int | str, ...] = ()  # field numbers, or names for training rows
    tokens: list[object] = field(default_factory=list)  # whatever the caller acks afterwards
    job: str = ""
    seen: set[tuple[int, int, int]] = field(default_factory=set)  # (epoch, first time, n)
    written_parts: int = 0  # how many parts its last provisional write held


@dataclass(frozen=True)
class Closed:
    """A finished window: its InfluxDB line, the tokens whose data it held, and the
    mean of each field (what the detectors look at)."""
    line: str
    tokens: list[object]
    start_ns: int
    end_ns: int
    node: str = ""
    kind: int = 0
    device: int = 0
    job: str = ""
    means: dict[str, float] = field(default_factory=dict)
    final: bool = True  # False: written while its partition is silent; may grow yet


def escape_tag(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


class WindowSet:
    """All open windows of one width, keyed by (partition, node, kind, device); a
    partition is any hashable, e.g. (topic, partition number)."""

    def __init__(self, width_s: float, lateness_s: float, idle_s: float,
                 final_idle_s: float | None = None):
        self.width_ns = int(width_s * 1e9)
        self.label = f"{width_s:g}s"
        self.lateness_ns = int(lateness_s * 1e9)
        self.idle_s = idle_s
        self.final_idle_s = 5 * idle_s if final_idle_s is None else final_idle_s
        self.open: dict[tuple, dict[int, _Window]] = defaultdict(dict)
        self.watermark: dict = {}               # partition -> max event time seen (ns)
        self.last_seen: dict = {}               # partition -> monotonic time of last batch
        self.late_samples = 0
        self.skip_before: dict[tuple, int] = {}  # key -> first window start it may write
        self.partial_skipped = 0
        self.duplicate_samples = 0

    def add(self, partition: Hashable, batch: batches.Batch, token: object) -> int:
        """Add a batch's samples to their windows; `token` comes back with each window.
        Returns how many windows now hold some of it."""
        joined = 0
        if not batch.samples:
            return joined
        key = (partition, batch.node_id, batch.device_kind, batch.device_index)
        fields, matrix = batch.matrix()
        times = batch.timestamps_ns
        starts = times - times % self.width_ns
        if key not in self.skip_before:
            # The first data of a device after a (re)start may begin mid-window: after a
            # crash the rest of that window was consumed (and written) before the last
            # commit. Never overwrite a window with such a tail: skip it. A first sample
            # less than one sampling interval after the window start is no tail: no
            # earlier sample of this device can lie in that window.
            first = int(starts[0])
            interval = int(np.median(np.diff(times))) if len(times) > 1 else 0
            begins = times[0] == first or int(times[0]) - first < interval
            self.skip_before[key] = first if begins else first + self.width_ns
        closed_before = self.watermark.get(partition, -1) - self.lateness_ns
        # Nearly every batch lies inside one window: skip the masks then.
        groups = [(int(starts[0]), slice(None))] if starts[0] == starts[-1] else \
            [(int(s), starts == s) for s in np.unique(starts)]
        for start, rows in groups:
            if start < self.skip_before[key]:
                self.partial_skipped += len(times[rows])
                continue
            if start + self.width_ns <= closed_before and start not in self.open[key]:
                self.late_samples += len(times[rows])  # that window is already written
                continue
            window = self.open[key].get(start)
            if window is None:
                window = self.open[key][start] = _Window(start, fields=fields,
                                                         job=batch.job_id)
            elif not window.job:  # learned mid-window (placement.py: a GPU's first event)
                window.job = batch.job_id
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
        self.watermark[partition] = max(self.watermark.get(partition, 0),
                                        int(batch.timestamps_ns.max()))
        self.last_seen[partition] = time.monotonic()
        return joined

    def drop_partitions(self, partitions: set) -> None:
        for key in [k for k in self.open if k[0] in partitions]:
            del self.open[key]
        for key in [k for k in self.skip_before if k[0] in partitions]:
            del self.skip_before[key]
        for partition in partitions:
            self.watermark.pop(partition, None)
            self.last_seen.pop(partition, None)

    def close_ready(self, now: float | None = None, flush_all: bool = False,
                    backlog=lambda partition: False) -> list[Closed]:
        """Windows whose end (plus lateness) the event time has passed (final), or whose
        partition has been idle for idle_s with nothing left to read (provisional: see
        the module's doc; final after final_idle_s). `backlog` says whether unread data
        waits: a worker busy elsewhere must not mistake that for silence. All of them,
        final, with flush_all. A final window already written whole provisionally comes
        back with an empty line: only its tokens are news."""
        now = time.monotonic() if now is None else now
        out = []
        silence: dict = {}
        for key, windows in list(self.open.items()):
            partition = key[0]
            silent_s = silence.get(partition)
            if silent_s is None:
                silent_s = 0.0 if backlog(partition) else \
                    now - self.last_seen.get(partition, now)
                silence[partition] = silent_s
            horizon = self.watermark.get(partition, 0) - self.lateness_ns
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
        _, node, kind, device = key
        times = np.concatenate([t for t, _ in window.parts])
        values = np.concatenate([v for _, v in window.parts])
        order = np.argsort(times, kind="stable")
        values = values[order]
        parts = []
        with np.errstate(all="ignore"):
            finite = np.isfinite(values)
            counts = finite.sum(axis=0)
            masked = np.where(finite, values, np.nan)
            if len(values):
                stats = {
                    "min": _nan_safe(np.nanmin, masked, counts),
                    "mean": _nan_safe(np.nanmean, masked, counts),
                    "max": _nan_safe(np.nanmax, masked, counts),
                    "p95": (np.percentile(values, 95, axis=0) if finite.all() else
                            _nan_safe(lambda a, axis: np.nanpercentile(a, 95, axis=axis),
                                      masked, counts)),
                    "last": _last_finite(masked),
                }
        means = {}
        for j, number in enumerate(window.fields):
            if counts[j] == 0:
                continue
            name = number if isinstance(number, str) else batches.field_name(number)
            parts += [f"{name}_{stat}={float(stats[stat][j])!r}" for stat in STATS]
            means[name] = float(stats["mean"][j])
        parts.append(f"samples={len(values)}i")
        if kind == TRAIN_KIND:
            tags = f"job={escape_tag(node)},rank={device},window={self.label}"
        else:
            tags = f"node={escape_tag(node)},window={self.label}"
        if kind == pb.DEVICE_KIND_GPU:
            tags += f",gpu={device}"
            if window.job:  # the job view and AdviseJob select a job's GPUs by this tag
                tags += f",job={escape_tag(window.job)}"
        line = f"{MEASUREMENT.get(kind, 'device')},{tags} {','.join(parts)} {window.start_ns}"
        if final and window.written_parts == len(window.parts):
            line = ""  # written whole already, while its partition was silent
        return Closed(line=line, tokens=window.tokens if final else [],
                      start_ns=window.start_ns, end_ns=window.start_ns + self.width_ns,
                      node=node, kind=kind, device=device, job=window.job, means=means,
                      final=final)


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
