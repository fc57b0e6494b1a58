"""KernelSummary events (topic mlpe.events.kernel) as InfluxDB points, measurement `kernel`.

One point per (job, rank, op, direction) and summary, at the summary's time_ns:
tags job, rank, op, direction, backend; fields calls (integer), total_ms, p50_ms, p99_ms,
max_ms, first_step, last_step, and gbps when the op's bytes per call are known
(bytes_moved > 0): bytes_moved x calls over total_ms, i.e. the mean bandwidth of the window.

Pure functions, no Faust. `kernel_lines` raises ValueError with the reason for the
dead-letter topic: a summary is written whole or not at all. Tags are validated, not
escaped: an identifier that is not a plain name (letters, digits, `._:@/+-`, bounded
length) is refused, so no value can add a line, a tag or a field. NaN and inf: the
timings are milliseconds measured by the rank, so a non-finite or negative one is a
broken measurement and refuses the summary (line protocol has no NaN either).
"""

from __future__ import annotations

import math
import re
import time

from mlpe.v1 import training_pb2

MEASUREMENT = "kernel"
EARLIEST_NS = 1_577_836_800 * 10**9  # 2020-01-01: older is a broken clock
FUTURE_S = 86_400                    # more than a day ahead: a broken clock too
MAX_KERNELS = 1_000                  # ops x directions per summary; real ones have tens
MAX_RANK = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
_TIMINGS = ("total_ms", "p50_ms", "p99_ms", "max_ms")


def _name(what: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"KernelSummary: {what} {value[:64]!r} is not 1-128 of "
                         "letters, digits and ._:@/+- (starting with a letter or digit)")
    return value


def kernel_lines(raw: bytes, now_ns: int | None = None) -> list[str]:
    """A KernelSummary's bytes as line-protocol lines (one per op and direction)."""
    try:
        msg = training_pb2.KernelSummary.FromString(raw)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
        raise ValueError(f"not a KernelSummary: {err}") from None
    now_ns = time.time_ns() if now_ns is None else now_ns
    job = _name("job_id", msg.job_id)
    backend = _name("backend", msg.backend or "unknown")
    if not 0 <= msg.rank < MAX_RANK:
        raise ValueError(f"KernelSummary: rank {msg.rank} is not in 0..{MAX_RANK - 1}")
    if not 0 <= msg.first_step <= msg.last_step:
        raise ValueError(f"KernelSummary: steps {msg.first_step}..{msg.last_step} are not "
                         "0 <= first_step <= last_step")
    if not EARLIEST_NS <= msg.time_ns <= now_ns + FUTURE_S * 10**9:
        raise ValueError(f"KernelSummary: time_ns {msg.time_ns} is not a plausible time")
    if not 0 < len(msg.kernels) <= MAX_KERNELS:
        raise ValueError(f"KernelSummary: {len(msg.kernels)} kernels, not 1..{MAX_KERNELS}")
    lines, seen = [], set()
    for k in msg.kernels:
        op, direction = _name("op", k.op), _name("direction", k.direction)
        if (op, direction) in seen:  # two points of one series at one time: one would win
            raise ValueError(f"KernelSummary: {op}.{direction} appears twice")
        seen.add((op, direction))
        values = {name: getattr(k, name) for name in _TIMINGS}
        bad = [f"{n}={v}" for n, v in values.items() if not (math.isfinite(v) and v >= 0)]
        if bad or k.calls < 1 or not (math.isfinite(k.bytes_moved) and k.bytes_moved >= 0):
            raise ValueError(f"KernelSummary: {op}.{direction} has calls={k.calls} "
                             f"{' '.join(bad)} bytes_moved={k.bytes_moved}: timings must be "
                             "finite and >= 0, calls >= 1")
        fields = [f"calls={k.calls}i", *(f"{n}={v!r}" for n, v in values.items()),
                  f"first_step={msg.first_step}i", f"last_step={msg.last_step}i"]
        if k.bytes_moved > 0 and k.total_ms > 0:
            fields.append(f"gbps={k.bytes_moved * k.calls / (k.total_ms / 1e3) / 1e9!r}")
        lines.append(f"{MEASUREMENT},job={job},rank={msg.rank},op={op},direction={direction},"
                     f"backend={backend} {','.join(fields)} {msg.time_ns}")
    return lines
