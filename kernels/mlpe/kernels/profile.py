"""Per-op timings for the worker's kernel events, off unless asked for.

With profiling on (`enable()`, the `profiling()` context, or MLPE_KERNEL_PROFILE=1 at
import), every op call is timed: forward on either implementation, backward where it is
ours (the Triton autograd functions; a reference's backward is autograd's own and is not
separable). On CUDA the time comes from a pair of CUDA events read only when `report()`
is called, so timing never synchronises the training loop; on the CPU from perf_counter.
Off, the cost is one boolean test per call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from collections import defaultdict

import torch

_enabled: bool | None = None  # None: MLPE_KERNEL_PROFILE decides, read at first use
_cpu_ms: dict[str, list[float]] = defaultdict(list)
_cuda_events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)
_bytes: dict[str, int] = defaultdict(int)  # tensor bytes in and out, over all calls


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get("MLPE_KERNEL_PROFILE", "") not in ("", "0")
    return _enabled


@contextlib.contextmanager
def profiling():
    was = enabled()
    enable(True)
    try:
        yield
    finally:
        enable(was)


def _first_tensor_device(args) -> torch.device | None:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)


def _tensor_bytes(values) -> int:
    """Bytes of the tensors among `values` (a tuple or one value): the call's traffic as
    a fused op has it, each input read and each output written once."""
    values = values if isinstance(values, tuple | list) else (values,)
    return sum(v.nbytes for v in values if isinstance(v, torch.Tensor))


def timed(name: str, device_of=_first_tensor_device):
    """Decorator: time each call of the function under `name` (e.g. "rmsnorm.forward");
    `device_of(args)` says where the call's work runs (CUDA: timed with events)."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not (_enabled if _enabled is not None else enabled()):
                return fn(*args, **kwargs)
            device = device_of(args)
            if device is not None and device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                _cuda_events[name].append((start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                _cpu_ms[name].append((time.perf_counter() - t0) * 1e3)
            _bytes[name] += _tensor_bytes(args) + _tensor_bytes(out)
            return out
        return call
    return wrap


def report(reset: bool = True) -> dict[str, dict[str, float]]:
    """{name: {calls, total_ms, mean_ms, p50_ms, p99_ms, max_ms, bytes_per_call}} since
    the last reset; bytes_per_call is 0 when the op's arguments hold no tensors (the
    optimizer step: its traffic is not known from its arguments)."""
    times = {name: list(ms) for name, ms in _cpu_ms.items()}
    if _cuda_events:
        torch.cuda.synchronize()
        for name, pairs in _cuda_events.items():
            times.setdefault(name, []).extend(s.elapsed_time(e) for s, e in pairs)
    moved = dict(_bytes)
    if reset:
        _cpu_ms.clear()
        _cuda_events.clear()
        _bytes.clear()
    return {name: {"calls": len(ms), "total_ms": sum(ms), "mean_ms": sum(ms) / len(ms),
                   "p50_ms": statistics.median(ms),
                   "p99_ms": sorted(ms)[min(len(ms) - 1, int(0.99 * len(ms)))],
                   "max_ms": max(ms), "bytes_per_call": moved.get(name, 0) / len(ms)}
            for name, ms in sorted(times.items()) if ms}
