"""LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * weight + bias.

The Triton forward reads x once and writes y once, keeping the per-row mean and 1/std
for backward; backward works in row tiles and sums each program's share of the weight
and bias gradients afterwards (the same layout as rmsnorm.py).
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
MAX_COLS = 65536


def layernorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        eps: float = 1e-5) -> torch.Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.nn.functional.layer_norm(x.to(acc), x.shape[-1:], weight.to(acc),
                                       None if bias is None else bias.to(acc), eps)
    return y.to(x.dtype)


if triton is not None:
    @triton.jit
    def _forward_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, n_cols, eps,
                        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        centred = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
        y = centred * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy,
                         stride_x, stride_dx, n_rows, n_cols, ROWS: tl.constexpr,
                         BLOCK: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for start in tl.range(pid * ROWS, n_rows, programs * ROWS, num_stages=STAGES):
            rows = start + tl.arange(0, ROWS)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w[None, :]
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
            mean_g = tl.sum(g, axis=1)[:, None] / n_cols
            mean_gx = tl.sum(g * xhat, axis=1)[:, None] / n_cols
            dx = rstd * (g - mean_g - xhat * mean_gx)
            tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                     mask=mask)
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)
        tl.store(DB_PARTIAL + pid * n_cols + cols, db, mask=col_mask)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape, n_cols = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n_cols)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        y = torch.empty_like(x2)
        mean = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(n_cols)
        if x2.shape[0]:
            _forward_kernel[(x2.shape[0],)](
                x2, weight, bias if bias is not None else weight, y, mean, rstd, x2.stride(0),
                y.stride(0), n_cols, eps, HAS_BIAS=bias is not None, BLOCK=block,
                num_warps=min(max(block // 256, 1), 16))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias, ctx.shape = bias is not None, shape
        return y.view(shape)

    @staticmethod
    @timed("layernorm.backward")
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x.shape
        dy = dy.reshape(-1, n_cols)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = torch.empty_like(x)
        block = triton.next_power_of_2(n_cols)
        # Loads per row: dy and x. Prefetching doubles what a program holds; for the widest
        # rows (two fp32 gradient accumulators as wide as the row already) it costs more
        # than it hides, hence the smaller budget than rmsnorm's.
        rows, programs, stages = row_tiles(n_rows, block, 2 * block * x.element_size(),
                                           x.device, prefetch_budget=64 * 1024)
        partial = torch.empty(2, programs, n_cols, dtype=torch.float32, device=x.device)
        if n_rows:
            _backward_kernel[(programs,)](
                dy, x, weight, mean, rstd, dx, partial[0], partial[1], dy.stride(0),
                x.stride(0), dx.stride(0), n_rows, n_cols, ROWS=rows, BLOCK=block,
                STAGES=stages, num_warps=min(max(block // 256, 1), 16))
            dw, db = partial.sum(1).to(weight.dtype)
        else:
            dw, db = torch.zeros_like(weight), torch.zeros_like(weight)
        return dx.view(ctx.shape), dw, (db if ctx.has_bias else None), None


@timed("layernorm.forward")
def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              eps: float = 1e-5) -> torch.Tensor:
    if x.shape[-1:] != weight.shape or (bias is not None and bias.shape != weight.shape):
        raise ValueError(f"layernorm: weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} must both be "
                         f"({x.shape[-1]},), the last dimension of x")
    if use_triton(x, weight, bias):
        if x.dtype not in DTYPES:
            warn_once("layernorm", f"dtype {x.dtype} is not one of fp32, bf16, fp16")
        elif x.shape[-1] > MAX_COLS:
            warn_once("layernorm", f"rows longer than {MAX_COLS} elements")
        else:
            return LayerNormFunction.apply(x, weight, bias, eps)
    return layernorm_reference(x, weight, bias, eps)


class LayerNorm(nn.Module):
    """Drop-in for torch.nn.LayerNorm(hidden, eps, bias=True) over the last dimension."""

    def __init__(self, hidden: int, eps: float = 1e-5, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden, device=device, dtype=dtype)) if bias \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layernorm(x, self.weight, self.bias, self.eps)
