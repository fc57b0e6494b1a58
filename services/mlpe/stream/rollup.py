"""1 min windows made from the final 10 s ones, in the stream (no InfluxDB task).

Each statistic of a minute combines those of its 10 s windows exactly where it can:
min of the mins, max of the maxes, the mean weighted by each window's samples, the last
of the last window that had one; p95 is the largest of the six p95s, an upper bound of
the minute's (the samples themselves are gone by then). A minute holds the events of
its 10 s windows (their tokens) until it is written, so the offset guarantee of acks.py
covers it too: a worker killed mid-minute replays the whole minute.

A source's first minute after a (re)start is written only if its first 10 s window
starts the minute: otherwise it may be the tail of a minute written before a crash,
and writing it would overwrite the whole minute with a part of it (windows.py does the
same with its own tails).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from mlpe.stream.windows import STATS, Closed, window_lines

WIDTH_S = 60.0
OF_WIDTH_S = 10.0  # the windows a minute is made of
# A minute whose source went silent mid-minute is written after IDLE_S without a new
# 10 s window, provisionally (more may come: it is written again, whole, if so), and
# final after FINAL_IDLE_S (its events held till then, as windows.py does).
IDLE_S = 30.0
FINAL_IDLE_S = 60.0
_MIN, _MEAN, _MAX, _P95, _LAST = (STATS.index(s) for s in ("min", "mean", "max", "p95", "last"))


@dataclass
class _Minute:
    start_ns: int
    names: tuple[str, ...]
    jobs: tuple[str, ...]
    parts: list[Closed] = field(default_factory=list)
    tokens: list[object] = field(default_factory=list)
    keep: bool = True  # False: the tail of a minute after a restart, never written
    written_parts: int = 0  # how many parts its last provisional write held


class Rollup:
    """Open minutes, one per source (a 10 s window's `source` plus its field names)."""

    def __init__(self, width_s: float = WIDTH_S, of_width_s: float = OF_WIDTH_S,
                 idle_s: float = IDLE_S, final_idle_s: float = FINAL_IDLE_S):
        self.width_ns = int(width_s * 1e9)
        self.of_width_ns = int(of_width_s * 1e9)
        self.label = f"{width_s / 60:g}m" if width_s % 60 == 0 else f"{width_s:g}s"
        self.idle_s, self.final_idle_s = idle_s, final_idle_s
        self.open: dict[tuple, _Minute] = {}
        self.last_seen: dict[tuple, float] = {}
        self.seen: set[tuple] = set()  # sources whose first minute was decided
        self.tails_skipped = 0

    def roll(self, closed: list[Closed], now: float | None = None,
             backlog=lambda partition: False) -> list[Closed]:
        """Closed windows in, the same out plus the minutes that closed. The tokens of a
        final 10 s window move to its minute: they are released when it is written.
        `backlog` as in WindowSet.close_ready: unread data is no silence."""
        now = time.monotonic() if now is None else now
        out: list[Closed] = []
        for window in closed:
            if window.final and window.stats is not None and \
                    window.end_ns - window.start_ns == self.of_width_ns:
                out += self._add(window, now)
                window = replace(window, tokens=[])
            out.append(window)
        return out + self.close_idle(now, backlog)

    def _add(self, window: Closed, now: float) -> list[Closed]:
        key = (window.source, window.names)
        start = window.start_ns - window.start_ns % self.width_ns
        out = []
        minute = self.open.get(key)
        if minute is not None and minute.start_ns != start:  # the next minute began
            out.append(self._close(key, self.open.pop(key)))
            minute = None
        if minute is None:
            first = key not in self.seen
            self.seen.add(key)
            minute = self.open[key] = _Minute(
                start, window.names, window.jobs,
                keep=not first or window.start_ns == start)
            self.tails_skipped += not minute.keep
        minute.parts.append(window)
        if not minute.keep:  # never written: nothing to hold its events for
            out.append(Closed(lines=[], tokens=window.tokens, start_ns=start,
                              end_ns=start + self.width_ns, node=window.node,
                              kind=window.kind, source=window.source))
        else:
            minute.tokens += window.tokens
        minute.jobs = tuple(a or b for a, b in zip(minute.jobs, window.jobs, strict=True))
        self.last_seen[key] = now
        if window.end_ns == start + self.width_ns:  # its last 10 s: the minute is whole
            out.append(self._close(key, self.open.pop(key)))
        return out

    def close_idle(self, now: float, backlog=lambda partition: False) -> list[Closed]:
        """Minutes whose source has sent no 10 s window for idle_s (provisional) or
        final_idle_s (final)."""
        out, busy = [], {}
        for key, minute in list(self.open.items()):
            partition = key[0][0]
            if partition not in busy:
                busy[partition] = backlog(partition)
            silent_s = 0.0 if busy[partition] else now - self.last_seen.get(key, now)
            if silent_s >= self.final_idle_s:
                out.append(self._close(key, self.open.pop(key)))
            elif silent_s >= self.idle_s and minute.written_parts != len(minute.parts):
                minute.written_parts = len(minute.parts)
                out.append(self._close(key, minute, final=False))
        return out

    def drop_partitions(self, partitions: set) -> None:
        """Forget the minutes of revoked partitions, unwritten: their events are replayed
        by the partitions' next owner (and their first minute decided anew)."""
        self.open = {k: m for k, m in self.open.items() if k[0][0] not in partitions}
        self.last_seen = {k: t for k, t in self.last_seen.items() if k[0][0] not in partitions}
        self.seen = {k for k in self.seen if k[0][0] not in partitions}

    def _close(self, key: tuple, minute: _Minute, final: bool = True) -> Closed:
        """The minute's lines and, final, its tokens; without lines if it is a restart's
        tail or was written whole already (provisionally)."""
        source, names = key
        _, node, kind, _ = source
        tokens = minute.tokens if final else []
        if final:
            self.last_seen.pop(key, None)
        if not minute.keep or (final and minute.written_parts == len(minute.parts)):
            return Closed(lines=[], tokens=tokens, start_ns=minute.start_ns,
                          end_ns=minute.start_ns + self.width_ns, node=node, kind=kind,
                          source=source, final=final)
        stats = np.stack([p.stats for p in minute.parts])    # (W, D, F, STATS)
        counts = np.stack([p.counts for p in minute.parts])  # (W, D, F)
        has = counts > 0
        table = np.full(stats.shape[1:], np.nan)
        with np.errstate(all="ignore"):
            table[..., _MIN] = np.fmin.reduce(np.where(has, stats[..., _MIN], np.nan))
            table[..., _MAX] = np.fmax.reduce(np.where(has, stats[..., _MAX], np.nan))
            table[..., _P95] = np.fmax.reduce(np.where(has, stats[..., _P95], np.nan))
            total = counts.sum(axis=0)
            table[..., _MEAN] = np.where(has, stats[..., _MEAN] * counts, 0).sum(axis=0) / total
            last = np.full(stats.shape[1:3], np.nan)
            for w in range(len(minute.parts)):  # in time order: the latest one with a value
                last = np.where(has[w], stats[w, ..., _LAST], last)
            table[..., _LAST] = last
        samples = sum(p.samples for p in minute.parts)
        lines, means = window_lines(self.label, source, names, table, total, samples,
                                    minute.jobs, minute.start_ns)
        return Closed(lines=lines, tokens=tokens, start_ns=minute.start_ns,
                      end_ns=minute.start_ns + self.width_ns, node=node, kind=kind,
                      devices=means, final=final, source=source, stats=table, counts=total,
                      names=names, samples=samples, jobs=minute.jobs)


