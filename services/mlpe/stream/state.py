"""Everything one stream worker keeps in memory, in one object (no Faust).

Lost on restart by design: the open windows and held events are rebuilt by replaying
from the last commit (acks.py); rule hold timers re-arm; a stall may fire again (the
notifier deduplicates); placements are read again from the start of their topic.
Detector state that must survive a restart is in the app's Faust tables instead,
recovered from their changelog topics.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from mlpe.stream.acks import AckQueues, Partition
from mlpe.stream.dedup import SeqFilter
from mlpe.stream.detectors import peers
from mlpe.stream.placement import Placements
from mlpe.stream.rollup import Rollup
from mlpe.stream.windows import WindowSet

WINDOW_WIDTHS_S = (1.0, 10.0)
IDLE_S = 2.0  # a partition silent this long gets its open windows written anyway
DELAYS_KEPT = 10_000  # the latest delays the stats percentiles are computed over


def _counters() -> dict[str, int]:
    # Logged as a dict by the stats timer; the integration tests read "{'batches': N".
    return {"batches": 0, "values": 0, "steps": 0, "dead_letters": 0, "windows_written": 0,
            "alerts": 0, "placements": 0, "duplicate_batches": 0, "late_batches": 0}


def _delays() -> deque[float]:
    return deque(maxlen=DELAYS_KEPT)


@dataclass
class StreamState:
    windows: list[WindowSet]  # open windows, one set per width
    minutes: Rollup = field(default_factory=Rollup)  # 1 min windows of the 10 s ones
    ack_queues: AckQueues = field(default_factory=AckQueues)  # events held until written
    last_offsets: dict[Partition, int] = field(default_factory=dict)  # last one processed
    rule_states: dict[str, dict] = field(default_factory=dict)  # rule|node|gpu -> hold state
    throttle_masks: dict[tuple[str, int], int] = field(default_factory=dict)  # (node, gpu)
    peer_buckets: dict[str, peers.Buckets] = field(default_factory=dict)  # job -> unjudged s
    stalled_jobs: set[str] = field(default_factory=set)  # stall alert fired, not resolved
    annotations: list[str] = field(default_factory=list)  # alert points for the next write
    counters: dict[str, int] = field(default_factory=_counters)
    close_delays: deque[float] = field(default_factory=_delays)  # 1 s window end -> written
    arrival_delays: deque[float] = field(default_factory=_delays)  # last sample -> consumed
    placements: Placements = field(default_factory=Placements)  # mlpe.placement, all of it
    gpu_types: dict[str, dict[int, str]] = field(default_factory=dict)  # node -> GPU index
    # -> GPU type, from mlpe.inventory (all of it): what gpu_cost prices a GPU at
    seqs: SeqFilter = field(default_factory=SeqFilter)  # batches seen, by device and seq
    committable: dict[Partition, int] = field(default_factory=dict)  # metrics: acked to here
    clock_ahead: set[str] = field(default_factory=set)  # nodes whose clock alert is firing
    late_by_node: dict[str, int] = field(default_factory=dict)  # samples dropped late
    job_states: dict[str, dict] = field(default_factory=dict)  # job -> newest detector state
    job_saved_ns: dict[str, int] = field(default_factory=dict)  # job -> its last table write
    job_partitions: dict[str, Partition] = field(default_factory=dict)  # job -> its events'
    series_states: dict[str, dict] = field(default_factory=dict)  # node/gpu -> newest
    series_saved_ns: dict[str, int] = field(default_factory=dict)  # its last table write
    series_partitions: dict[str, Partition] = field(default_factory=dict)  # its reports'
    # Set once mlpe.placement was read to its end (None: nobody reads it, as in unit tests).
    placements_loaded: asyncio.Event | None = None

    @classmethod
    def create(cls, lateness_s: float) -> StreamState:
        """A fresh state with empty 1 s and 10 s windows waiting `lateness_s` for late
        samples (and 1 min ones made of the 10 s ones)."""
        return cls(windows=[WindowSet(width, lateness_s, IDLE_S) for width in WINDOW_WIDTHS_S])
