"""RMSNorm, optionally fused with the residual add that precedes it in a transformer block.

    h = x + residual              (when a residual is given; h is returned as the new
                                   residual stream)
    y = h / sqrt(mean(h²) + eps) * weight

The reference is plain PyTorch; the Triton kernels read x (and the residual) once and write
y (and h) once: one pass over the row in each direction, statistics in fp32. Backward
recomputes nothing but the per-row 1/rms saved by forward.
"""

from __future__ import annotations

import torch
from torch import nn

from mlpe.kernels.dispatch import row_tiles, use_triton, warn_once
from mlpe.kernels.profile import timed

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is used
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_COLS = 65536  # one row per program, held in registers; longer rows use the reference


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      residual: torch.Tensor | None = None):
    """y, or (y, h) with a residual; statistics in fp32 (fp64 for fp64), outputs in x's
    dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x if residual is None else (x.to(acc) + residual.to(acc)).to(x.dtype)
    hf = h.to(acc)
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    return y.to(x.dtype) if residual is None else (y.to(x.dtype), h)


if triton is not None:
    @triton.jit
    def _forward_kernel(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, n_cols,
                        eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            h = h.to(H.dtype.element_ty)
            tl.store(H + row * stride_h + cols, h, mask=mask)
            h = h.to(tl.float32)  # normalise what is stored, as the reference does
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        tl.store(RSTD + row, rstd)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(DY, H, W, RSTD, DH_NEXT, DX, DW_PARTIAL, stride_dy, stride_h,
                         stride_dn, stride_dx, n_rows, n_cols, HAS_DH_NEXT: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
        # Each program takes tiles of ROWS rows (wide loads for short rows), every G-th
        # tile, and keeps its share of dweight in registers; the shares are summed after.
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for start in tl.range(pid * ROWS, n_rows, programs * ROWS, num_stages=STAGES):
            rows = start + tl.arange(0, ROWS)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            h = tl.load(H + rows64 * stride_h + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
            g = dy * w[None, :]
            dw += tl.sum(dy * h * rstd, axis=0)
            c = tl.sum(g * h, axis=1)[:, None] / n_cols
            dh = rstd * (g - h * (rstd * rstd * c))
            if HAS_DH_NEXT:
                dh += tl.load(DH_NEXT + rows64 * stride_dn + cols[None, :], mask=mask,
                              other=0.0).to(tl.float32)
            tl.store(DX + rows64 * stride_dx + cols[None, :], dh.to(DX.dtype.element_ty),
                     mask=mask)
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


def _launch_config(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    return block, min(max(block // 256, 1), 16)  # (BLOCK, num_warps)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        shape, n_cols = x.shape, x.shape[-1]
        x2 = _rows(x)
        r2 = None if residual is None else _rows(residual)
        y = torch.empty_like(x2)
        h = x2 if r2 is None else torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block, warps = _launch_config(n_cols)
        if x2.shape[0]:
            _forward_kernel[(x2.shape[0],)](
                x2, r2 if r2 is not None else x2, weight, y, h, rstd, x2.stride(0),
                r2.stride(0) if r2 is not None else 0, y.stride(0), h.stride(0), n_cols, eps,
                HAS_RESIDUAL=r2 is not None, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual, ctx.shape = r2 is not None, shape
        ctx.set_materialize_grads(False)
        if r2 is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    @timed("rmsnorm.backward")
    def backward(ctx, dy, dh_next=None):
        h, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = h.shape
        dy2 = _rows(dy) if dy is not None else torch.zeros_like(h)
        dn2 = None if dh_next is None else _rows(dh_next)
        dx = torch.empty_like(h)
        block, warps = _launch_config(n_cols)
        # Loads per row: dy and h (and dh_next); prefetch while shared memory allows it.
        rows, programs, stages = row_tiles(
            n_rows, block, block * h.element_size() * (3 if dn2 is not None else 2), h.device,
            prefetch_budget=160 * 1024)
        dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=h.device)
        if n_rows:
            _backward_kernel[(programs,)](
                dy2, h, weight, rstd, dn2 if dn2 is not None else dy2, dx, dw_partial,
                dy2.stride(0), h.stride(0), dn2.stride(0) if dn2 is not None else 0,
                dx.stride(0), n_rows, n_cols, HAS_DH_NEXT=dn2 is not None, ROWS=rows,
                BLOCK=block, STAGES=stages, num_warps=warps)
        dw = dw_partial.sum(0).to(weight.dtype) if n_rows else torch.zeros_like(weight)
        dx = dx.view(ctx.shape)
        return dx, dw, (dx if ctx.has_residual else None), None


@timed("rmsnorm.forward")
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
            residual: torch.Tensor | None = None):
    """y = RMSNorm(x [+ residual]) * weight; with a residual, returns (y, x + residual)."""
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"rmsnorm: weight has shape {tuple(weight.shape)}, the last "
                         f"dimension of x is {x.shape[-1]}: they must match")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rmsnorm: residual {tuple(residual.shape)} {residual.dtype} must "
                         f"have x's shape {tuple(x.shape)} and dtype {x.dtype}")
    if use_triton(x, weight, residual):
        if x.dtype not in DTYPES:
            warn_once("rmsnorm", f"dtype {x.dtype} is not one of fp32, bf16, fp16")
        elif x.shape[-1] > MAX_COLS:
            warn_once("rmsnorm", f"rows longer than {MAX_COLS} elements")
        else:
            return RMSNormFunction.apply(x, weight, residual, eps)
    return rmsnorm_reference(x, weight, eps, residual)


class RMSNorm(nn.Module):
    """Drop-in for torch.nn.RMSNorm(hidden, eps) with a learnable weight; forward(x) or
    forward(x, residual) -> (y, new residual)."""

    def __init__(self, hidden: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rmsnorm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
