"""Exact duplicates of metric batches, dropped by (node, kind, agent epoch, device, seq).

An agent numbers each device's batches 0, 1, 2, ... per agent process (epoch). Kafka
keeps a node's batches in order (one key, one partition) and the agent's spool replays
in order, so past its first batch a device's sequence only moves forward: a number
at or below the highest seen is a repeat (a spool replayed twice after a second
outage, a producer's retry). Memory: one integer per device and epoch; epochs not
heard from for `forget_after_s` are dropped.
"""

from __future__ import annotations

import time

import numpy as np

from mlpe.common import batches


class SeqFilter:
    def __init__(self, forget_after_s: float = 600.0) -> None:
        self.forget_after_s = forget_after_s
        # (node, kind, epoch) -> (highest seq per device index, monotonic time last seen)
        self.highest: dict[tuple[str, int, int], tuple[dict[int, int], float]] = {}
        self.duplicates = 0  # device batches dropped

    def fresh(self, batch: batches.NodeBatch) -> np.ndarray:
        """Which devices of `batch` are new (bool per device); remembers them."""
        key = (batch.node_id, batch.device_kind, batch.agent_epoch_ns)
        entry = self.highest.get(key)
        seen = {} if entry is None else entry[0]
        self.highest[key] = (seen, time.monotonic())
        keep = np.ones(batch.devices, dtype=bool)
        for d, (index, seq) in enumerate(zip(batch.device_indices.tolist(),
                                             batch.batch_seqs.tolist(), strict=True)):
            last = seen.get(index)
            if last is not None and seq <= last:
                keep[d] = False
                self.duplicates += 1
            else:
                seen[index] = seq
        return keep

    def forget_quiet(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key in [k for k, (_, t) in self.highest.items() if now - t > self.forget_after_s]:
            del self.highest[key]
