"""SwiGLU, the gated activation of Llama-style MLPs: y = silu(gate) * up.

Unfused, PyTorch reads gate, writes silu(gate), reads it and up, writes y (and keeps
silu(gate) for backward). The Triton kernels read gate and up once and write y once;
backward recomputes silu from gate instead of storing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlpe.kernels.dispatch import use_triton, warn_once
from mlpe.kernels.profile import timed

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is used
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 2048


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


if triton is not None:
    @triton.jit
    def _forward_kernel(GATE, UP, Y, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        a = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offsets, (a * tl.sigmoid(a) * b).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(GATE, UP, DY, DGATE, DUP, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        a = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        tl.store(DUP + offsets, (dy * silu).to(DUP.dtype.element_ty), mask=mask)
        dgate = dy * b * (sig * (1.0 + a * (1.0 - sig)))  # d silu(a) / da
        tl.store(DGATE + offsets, dgate.to(DGATE.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _forward_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK,
                                                      num_warps=8)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    @timed("swiglu.backward")
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _backward_kernel[(triton.cdiv(n, BLOCK),)](gate, up, dy, dgate, dup, n,
                                                       BLOCK=BLOCK, num_warps=8)
        return dgate, dup


@timed("swiglu.forward")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, fused on CUDA."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up "
                         f"{tuple(up.shape)} {up.dtype} must have the same shape and dtype")
    if use_triton(gate, up):
        if gate.dtype in DTYPES:
            return SwiGLUFunction.apply(gate, up)
        warn_once("swiglu", f"dtype {gate.dtype} is not one of fp32, bf16, fp16")
    return swiglu_reference(gate, up)


class SwiGLUMLP(nn.Module):
    """The Llama MLP: down(silu(gate(x)) * up(x)), with the activation fused."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
