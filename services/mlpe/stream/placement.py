"""Which job a GPU works for, from mlpe.placement and the GPUs' process-memory events.

Pure, no Faust or Kafka. `mlpe control` publishes a JobPlacement (the pids of a job's
ranks on a node) at each launch and an ended one when those processes are gone; agents
name the pids on each GPU once a second (EVENT_PROCESS_MEMORY). A GPU batch without a
job of its own gets the job of those pids, and between events (batches come every
100 ms) the job last learned for that GPU, until the placement ends or that GPU has
named none of the job's pids for FORGET_AFTER_S.
"""

from __future__ import annotations

from mlpe.common import batches
from mlpe.v1 import metrics_pb2, training_pb2

FORGET_AFTER_S = 30.0


class Placements:
    def __init__(self, forget_after_s: float = FORGET_AFTER_S) -> None:
        self.forget_after_ns = int(forget_after_s * 1e9)
        self.pids: dict[str, dict[int, str]] = {}                # node -> pid -> job
        self.placed: dict[tuple[str, str], list[int]] = {}       # (node, job) -> its pids
        self.gpus: dict[tuple[str, int], tuple[str, int]] = {}   # (node, gpu) -> (job, seen ns)
        self.learned_on: dict[str, int] = {}                     # node -> GPUs in self.gpus

    def apply(self, placement: training_pb2.JobPlacement) -> None:
        """The latest word on (node, job): its pids now, or, ended, none any more."""
        node, job = placement.node_id, placement.job_id
        if placement.ended:
            self.forget(node, job)
            return
        self._drop_pids(node, job)
        pids = [rank.pid for rank in placement.ranks]
        self.placed[(node, job)] = pids
        known = self.pids.setdefault(node, {})
        for pid in pids:
            known[pid] = job  # a pid reused by a newer job: the newer placement wins

    def forget(self, node: str, job: str) -> None:
        """The job's processes on `node` are gone: its pids and what its GPUs learned."""
        self._drop_pids(node, job)
        for gpu in [g for g, (j, _) in self.gpus.items() if g[0] == node and j == job]:
            self._unlearn(gpu)

    def _drop_pids(self, node: str, job: str) -> None:
        known = self.pids.get(node, {})
        for pid in self.placed.pop((node, job), ()):
            if known.get(pid) == job:
                del known[pid]
        if not known:
            self.pids.pop(node, None)

    def job_of(self, batch: batches.Batch) -> str:
        """The job of a device's batch: its own job_id if it has one, else (GPU batches)
        the job of the pids its process-memory events name, else the job last learned for
        its GPU."""
        if batch.job_id or batch.device_kind != metrics_pb2.DEVICE_KIND_GPU:
            return batch.job_id
        now = int(batch.timestamps_ns[-1]) if batch.samples else None
        return self._job(batch.node_id, batch.device_index, batch.events, now)

    def jobs_of(self, batch: batches.NodeBatch) -> list[str]:
        """job_of for every device of a node batch."""
        if batch.job_id or batch.device_kind != metrics_pb2.DEVICE_KIND_GPU:
            return [batch.job_id] * batch.devices
        if batch.node_id not in self.pids and batch.node_id not in self.learned_on:
            return [""] * batch.devices  # nothing placed on this node: the common case
        now = int(batch.timestamps_ns[-1]) if batch.samples else None
        return [self._job(batch.node_id, index, events, now)
                for index, events in zip(batch.device_indices.tolist(), batch.events,
                                         strict=True)]

    def _job(self, node: str, index: int, events, now: int | None) -> str:
        gpu = (node, index)
        named = [e for e in events if e.kind == metrics_pb2.EVENT_PROCESS_MEMORY]
        if named:
            # One second's events list every process on the GPU: if none is a placed one,
            # the GPU no longer works for the job it did. Shared by several jobs: the one
            # using the most memory.
            known = self.pids.get(node, {})
            placed = [(e.value, e.time_ns, known[e.code]) for e in named if e.code in known]
            if placed:
                _, seen, job = max(placed)
                if gpu not in self.gpus:
                    self.learned_on[node] = self.learned_on.get(node, 0) + 1
                self.gpus[gpu] = (job, seen)
            else:
                self._unlearn(gpu)
        learned = self.gpus.get(gpu)
        if learned is None:
            return ""
        job, seen = learned
        if now is None:
            now = seen
        if now - seen > self.forget_after_ns:
            self._unlearn(gpu)
            return ""
        return job

    def _unlearn(self, gpu: tuple[str, int]) -> None:
        if self.gpus.pop(gpu, None) is not None:
            left = self.learned_on[gpu[0]] - 1
            if left:
                self.learned_on[gpu[0]] = left
            else:
                del self.learned_on[gpu[0]]
