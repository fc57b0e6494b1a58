"""What the fleet's GPUs cost, busy or idle: measurement `gpu_cost`, one point per GPU per
closed 10 s window, at the window's start.

Tags node, gpu, gpu_type (the GPU model of the node's inventory, mlpe.common.gpus name;
"unknown" before the inventory is read or for a model without a type), currency,
window=10s (so it lives in the 10 s bucket, with that resolution's retention). Fields:
seconds (the whole seconds of the window with samples: a GPU that reports is a GPU paid
for, and a node that starts or stops mid-window pays for its part), idle_seconds (all of
them when the window's mean utilization is under MLPE_IDLE_UTIL_PCT, else 0; a window with
no utilization reading is not called idle), cost and idle_cost (seconds x the price per
GPU-hour of its type, MLPE_PRICING; 0 for a type the price table lacks).

Final windows only: a provisional one may grow yet, and the final one of the same window
would overwrite it anyway (same series, same time).
"""

from __future__ import annotations

import math

from mlpe.common.gpus import canonical
from mlpe.common.prices import PriceTable
from mlpe.stream.windows import Closed, escape_tag
from mlpe.v1 import metrics_pb2

MEASUREMENT = "gpu_cost"
WIDTH_NS = 10 * 10**9
UNKNOWN = "unknown"


def inventory_types(inventory: metrics_pb2.NodeInventory) -> dict[int, str]:
    """GPU index -> GPU type of one node's inventory."""
    return {g.index: canonical(g.name) or UNKNOWN for g in inventory.gpus}


def gpu_cost_lines(closed: list[Closed], types: dict[str, dict[int, str]],
                   table: PriceTable, pricing: str, idle_util_pct: float) -> list[str]:
    """The gpu_cost points of the closed 10 s GPU windows among `closed`."""
    lines = []
    for c in closed:
        if not c.final or c.kind != metrics_pb2.DEVICE_KIND_GPU or \
                c.end_ns - c.start_ns != WIDTH_NS:
            continue
        node_types = types.get(c.node, {})
        seconds = float(c.seconds)
        for device in c.devices:
            gpu_type = node_types.get(device.index, UNKNOWN)
            price = table.gpus[gpu_type].of(pricing) if gpu_type in table.gpus else 0.0
            util = device.means.get("util", math.nan)
            idle = seconds if math.isfinite(util) and util < idle_util_pct else 0.0
            lines.append(
                f"{MEASUREMENT},node={escape_tag(c.node)},gpu={device.index},"
                f"gpu_type={gpu_type},currency={table.currency},window=10s "
                f"seconds={seconds!r},idle_seconds={idle!r},cost={seconds * price / 3600!r},"
                f"idle_cost={idle * price / 3600!r} {c.start_ns}")
    return lines
