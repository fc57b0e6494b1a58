"""Which implementation an op runs: Triton on CUDA, the plain-PyTorch reference elsewhere.

Chosen once per process from MLPE_KERNELS: "auto" (default: Triton for CUDA tensors when
Triton imports), "triton" (the same, but say so if it cannot be had) or "reference"
(always the reference: for tests and for ruling the kernels out when debugging).
MLPE_KERNELS=triton with TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors too,
in Triton's interpreter: slow, for testing the kernels' code without a GPU.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("mlpe.kernels")
CHOICES = ("auto", "triton", "reference")


@functools.cache
def backend() -> str:
    choice = os.environ.get("MLPE_KERNELS", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"MLPE_KERNELS={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice != "reference" and not triton_available():
        if choice == "triton":
            log.warning("MLPE_KERNELS=triton but Triton cannot be imported: using the "
                        "PyTorch references")
        return "reference"
    return choice


@functools.cache
def triton_available() -> bool:
    """Do the kernels' imports work? (triton.language, not just triton: under
    TRITON_INTERPRET=1 it also needs numpy, which mlpe-kernels[interpret] brings.)"""
    try:
        import triton.language  # noqa: F401
    except ImportError as err:
        log.info("Triton unavailable (%s): the PyTorch references run", err)
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton for this call: the backend allows it and every tensor is on a CUDA device."""
    if backend() == "reference":
        return False
    return interpreting() or all(t.is_cuda for t in tensors if t is not None)


@functools.cache
def interpreting() -> bool:
    return backend() == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def warn_once(op: str, why: str) -> None:
    log.warning("%s: %s; using the PyTorch reference for such inputs", op, why)


def parallel_programs(device: torch.device) -> int:
    """How many programs keep the device busy in a persistent-style grid: 8 per SM on a GPU
    (4 elsewhere: Triton's interpreter runs kernels on the CPU, for tests)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 8
    return 4


def row_tiles(n_rows: int, block: int, tile_bytes_per_row: int, device: torch.device,
              prefetch_budget: int) -> tuple[int, int, int]:
    """(rows per tile, programs, pipeline stages) for a row-wise backward kernel: tiles of
    ~4k elements for short rows, a persistent grid, and prefetching of the next tile only
    where two tiles fit in `prefetch_budget` bytes."""
    rows = max(1, min(16, 4096 // block))
    programs = max(1, min(-(-n_rows // rows), parallel_programs(device)))
    stages = 2 if 2 * rows * tile_bytes_per_row <= prefetch_budget else 1
    return rows, programs, stages
