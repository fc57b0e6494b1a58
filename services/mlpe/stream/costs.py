"""JobCost events (topic mlpe.events.cost, from `mlpe control`) as InfluxDB points,
measurement `cost`: one point per event at its time_ns, tagged job, gpu_type, pricing and
currency; fields gpus (integer), gpu_hours, total, useful, failure, paused (in currency),
useful_s, failure_s, paused_s, price_per_gpu_hour and budget.

`cost_line` raises ValueError with the reason for the dead-letter topic. Tags are
validated, not escaped (decoding.identifier_problem); amounts must be finite and >= 0.
"""

from __future__ import annotations

import math
import time

from mlpe.stream.decoding import identifier_problem
from mlpe.v1 import control_pb2

MEASUREMENT = "cost"
EARLIEST_NS = 1_577_836_800 * 10**9  # 2020-01-01: older is a broken clock
FUTURE_S = 86_400
MAX_GPUS = 1 << 20
_AMOUNTS = ("gpu_hours", "total", "useful", "failure", "paused", "useful_s", "failure_s",
            "paused_s", "price_per_gpu_hour", "budget")


def cost_line(raw: bytes, now_ns: int | None = None) -> str:
    """A JobCost's bytes as one line-protocol line."""
    try:
        msg = control_pb2.JobCost.FromString(raw)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
        raise ValueError(f"not a JobCost: {err}") from None
    now_ns = time.time_ns() if now_ns is None else now_ns
    tags = {"job": msg.job_id, "gpu_type": msg.gpu_type or "none",
            "pricing": msg.pricing or "on_demand", "currency": msg.currency or "none"}
    for name, value in tags.items():
        problem = identifier_problem(name, value)
        if problem:
            raise ValueError(f"JobCost: {problem}")
    if not 0 <= msg.gpus <= MAX_GPUS:
        raise ValueError(f"JobCost: gpus {msg.gpus} is not in 0..{MAX_GPUS}")
    if not EARLIEST_NS <= msg.time_ns <= now_ns + FUTURE_S * 10**9:
        raise ValueError(f"JobCost: time_ns {msg.time_ns} is not a plausible time")
    values = {name: getattr(msg, name) for name in _AMOUNTS}
    bad = [f"{n}={v}" for n, v in values.items() if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"JobCost: {' '.join(bad)}: amounts must be finite and >= 0")
    fields = ",".join([f"gpus={msg.gpus}i", *(f"{n}={v!r}" for n, v in values.items())])
    tag_text = ",".join(f"{k}={v}" for k, v in tags.items())
    return f"{MEASUREMENT},{tag_text} {fields} {msg.time_ns}"
