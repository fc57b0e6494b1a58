"""The Kafka topics of mlpe (docs/architecture.md), declared once; `mlpe stack up` makes them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    retention_ms: int
    key: str
    value: str
    compacted: bool = False  # keep the latest value per key (inventories)

    @property
    def config(self) -> dict[str, str]:
        config = {"retention.ms": str(self.retention_ms), "compression.type": "producer"}
        if self.compacted:
            config["cleanup.policy"] = "compact"
        return config


# Partitions bound stream-processor parallelism (one worker per partition at most);
# metric topics carry the volume, so they get the most. The defaults size a fleet of
# 10,000 GPUs (README: "Partitions"); MLPE_GPU_METRICS_PARTITIONS and
# MLPE_HOST_METRICS_PARTITIONS change them (`configured`).
GPU_METRICS = Topic("mlpe.metrics.gpu", 24, 6 * HOUR_MS, "node id",
                    "GPU metric batch: every GPU of a node")
HOST_METRICS = Topic("mlpe.metrics.host", 4, 6 * HOUR_MS, "node id", "host metric batch")
TRAIN_EVENTS = Topic("mlpe.events.train", 4, 7 * DAY_MS, "job id", "training step events")
KERNEL_EVENTS = Topic("mlpe.events.kernel", 4, 7 * DAY_MS, "job id", "kernel timing summaries")
COST_EVENTS = Topic("mlpe.events.cost", 1, 30 * DAY_MS, "job id",
                    "JobCost: what a job has cost so far (mlpe control)")
ALERTS = Topic("mlpe.alerts", 2, 30 * DAY_MS, "alert fingerprint", "alert (firing/resolved)")
DEAD_LETTER = Topic("mlpe.deadletter", 1, 30 * DAY_MS, "source topic", "refused bytes + reason")
INVENTORY = Topic("mlpe.inventory", 1, 365 * DAY_MS, "node id", "NodeInventory", compacted=True)
# Which pids on which node work for which job (from mlpe control); small, so every stream
# worker reads all of it and joins it with the GPUs' per-process memory events.
PLACEMENT = Topic("mlpe.placement", 1, 30 * DAY_MS, "node id/job id", "JobPlacement",
                  compacted=True)
# Internal to one `mlpe stream` app (Faust creates it as "<app id>-gpu-seconds", like its
# changelogs, so two apps never read each other's): each node's 1 s GPU means, keyed by
# job, so one worker sees every GPU of a job and can compare them.
GPU_SECONDS = Topic("gpu-seconds", 4, HOUR_MS, "job id", "per-node 1 s GPU means (JSON)")


def metrics_group(app_id: str) -> str:
    """The consumer group of one stream app's metrics consumer (its Faust agents are in
    the group named by the app id itself)."""
    return f"{app_id}-metrics"


def of_app(topic: Topic, app_id: str) -> Topic:
    """`topic` as one stream app's own: named "<app id>-<name>"."""
    return dataclasses.replace(topic, name=f"{app_id}-{topic.name}")

ALL_TOPICS: tuple[Topic, ...] = (
    GPU_METRICS,
    HOST_METRICS,
    TRAIN_EVENTS,
    KERNEL_EVENTS,
    COST_EVENTS,
    ALERTS,
    DEAD_LETTER,
    INVENTORY,
    PLACEMENT,
)


def configured(settings) -> tuple[Topic, ...]:
    """ALL_TOPICS with the partition counts the settings give the metric topics."""
    counts = {GPU_METRICS.name: settings.gpu_metrics_partitions,
              HOST_METRICS.name: settings.host_metrics_partitions}
    return tuple(dataclasses.replace(t, partitions=counts[t.name]) if t.name in counts else t
                 for t in ALL_TOPICS)
