"""Rotary position embedding (RoPE) for queries and keys, in one launch for both.

Layout (batch, seq, heads, head_dim), "rotate half" convention (Llama, GPT-NeoX): the
first and second halves of each head are the two coordinates of head_dim/2 planes,
rotated by position * base^(-2i/head_dim). Queries and keys may have different head
counts (grouped-query attention). The backward of a rotation is the rotation by the
opposite angle, so the same kernel serves both directions.
"""

from __future__ import annotations

import torch
from torch import nn

from mlpe.kernels.dispatch import use_triton, warn_once
from mlpe.kernels.profile import timed

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is used
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0, device=None):
    """(cos, sin), each (seq_len, head_dim / 2) in fp32."""
    if head_dim % 2:
        raise ValueError(f"rope: head_dim {head_dim} must be even")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(acc), x[..., half:].to(acc)
    c, s = cos[None, :, None, :].to(acc), sin[None, :, None, :].to(acc)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_reference(q, k, cos, sin):
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


if triton is not None:
    @triton.jit
    def _rotate_heads(X, OUT, row, heads, half, cos, sin, d, d_mask, BLOCK_H: tl.constexpr):
        h = tl.arange(0, BLOCK_H)[:, None]
        mask = (h < heads) & d_mask[None, :]
        offsets = row * heads * 2 * half + h * 2 * half + d[None, :]
        x1 = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + offsets + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offsets, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + offsets + half, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _rotate_kernel(Q, K, COS, SIN, QO, KO, seq_len, q_heads, k_heads, half,
                       SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (batch, position): every query and key head of that token.
        row = tl.program_id(0).to(tl.int64)
        pos = row % seq_len
        d = tl.arange(0, BLOCK_D)
        d_mask = d < half
        cos = tl.load(COS + pos * half + d, mask=d_mask, other=0.0)[None, :]
        sin = SIGN * tl.load(SIN + pos * half + d, mask=d_mask, other=0.0)[None, :]
        _rotate_heads(Q, QO, row, q_heads, half, cos, sin, d, d_mask, BLOCK_H)
        _rotate_heads(K, KO, row, k_heads, half, cos, sin, d, d_mask, BLOCK_H)


def _launch(q, k, cos, sin, sign):
    batch, seq, q_heads, head_dim = q.shape
    q, k = q.contiguous(), k.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.numel():
        _rotate_kernel[(batch * seq,)](
            q, k, cos, sin, q_out, k_out, seq, q_heads, k.shape[2], head_dim // 2, SIGN=sign,
            BLOCK_H=triton.next_power_of_2(max(q_heads, k.shape[2])),
            BLOCK_D=triton.next_power_of_2(head_dim // 2), num_warps=4)
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, 1.0)

    @staticmethod
    @timed("rope.backward")
    def backward(ctx, dq, dk):  # unused outputs arrive as zeros (materialized grads)
        cos, sin = ctx.saved_tensors
        return (*_launch(dq, dk, cos, sin, -1.0), None, None)


@timed("rope.forward")
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated (q, k); q (batch, seq, q_heads, head_dim), k (batch, seq, k_heads, head_dim),
    cos and sin (seq, head_dim / 2) from rope_cache (or its first seq rows)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or \
            q.shape[-1] != k.shape[-1] or q.dtype != k.dtype:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (batch, "
                         "seq, heads, head_dim) with the same batch, seq, head_dim and dtype")
    if q.shape[-1] % 2 or cos.shape != (q.shape[1], q.shape[-1] // 2) or \
            sin.shape != cos.shape:
        raise ValueError(f"rope: cos and sin must be (seq, head_dim / 2) = ({q.shape[1]}, "
                         f"{q.shape[-1] // 2}) with an even head_dim, got {tuple(cos.shape)}")
    if use_triton(q, k, cos, sin):
        if q.dtype in DTYPES:
            return RoPEFunction.apply(q, k, cos, sin)
        warn_once("rope", f"dtype {q.dtype} is not one of fp32, bf16, fp16")
    return rope_reference(q, k, cos, sin)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables up to max_seq; forward(q, k) rotates by position."""

    def __init__(self, head_dim: int, max_seq: int, base: float = 10000.0, device=None):
        super().__init__()
        cos, sin = rope_cache(max_seq, head_dim, base, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        seq = q.shape[1]
        if seq > self.cos.shape[0]:
            raise ValueError(f"rope: sequence of {seq} is longer than max_seq "
                             f"{self.cos.shape[0]}")
        return rope(q, k, self.cos[:seq], self.sin[:seq])
