"""The LM head and its loss in one op: mean cross-entropy of (x @ weight.T + bias) against
integer targets, without ever holding the whole (tokens, vocab) logits.

Unfused, a 128k vocabulary makes the logits, their fp32 copy, log-softmax and the
gradient the largest tensors of a step. Here the tokens are taken a chunk at a time: the
chunk's logits are computed, the cross-entropy kernel turns them in place into the
gradient of the mean loss, and that gradient is multiplied straight into the gradients of
x and of the weight. Forward therefore does the backward's work too (the usual trade for
this op) and backward only scales what was kept by the upstream gradient. Chunks are
sized so that one chunk's logits are no larger than x itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlpe.kernels.cross_entropy import DTYPES, hand_over
from mlpe.kernels.dispatch import use_triton, warn_once
from mlpe.kernels.profile import timed

try:
    import triton

    from mlpe.kernels.cross_entropy import BLOCK, _loss_and_grad_kernel
except ImportError:  # CPU-only installs: the reference is used
    triton = None


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor,
                                   targets: torch.Tensor, bias: torch.Tensor | None = None,
                                   ignore_index: int = -100) -> torch.Tensor:
    logits = F.linear(x, weight, bias)
    acc = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(acc), targets, ignore_index=ignore_index)


def chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: a chunk's logits (rows x vocab) about as large as x (n_rows x
    hidden), a power of two, at least 1 and at most n_rows."""
    rows = max(1, (n_rows * hidden) // max(vocab, 1))
    return max(1, min(n_rows, 1 << (rows.bit_length() - 1)))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, rows_per_chunk):
        n_rows, vocab = x.shape[0], weight.shape[0]
        n_valid = int((targets != ignore_index).sum())
        scale = 1.0 / max(n_valid, 1)
        loss = torch.zeros(n_rows, dtype=torch.float32, device=x.device)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        # In the weight's dtype (fp32 would double the memory saved): one rounding per chunk.
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=x.device) if need_b else None
        block = min(BLOCK, triton.next_power_of_2(vocab))
        for start in range(0, n_rows, rows_per_chunk):
            end = min(start + rows_per_chunk, n_rows)
            x_c = x[start:end]
            logits = F.linear(x_c, weight, bias)  # (rows, vocab), contiguous
            # In place: the kernel reads each row fully before writing its gradient.
            _loss_and_grad_kernel[(end - start,)](
                logits, targets[start:end], loss[start:end], logits, logits.stride(0),
                logits.stride(0), vocab, ignore_index, scale, BLOCK=block, num_warps=8)
            if grad_x is not None:
                torch.mm(logits, weight, out=grad_x[start:end])
            if grad_w is not None:
                grad_w.addmm_(logits.t(), x_c)
            if grad_b is not None:
                grad_b += logits.sum(0, dtype=torch.float32)
        ctx.save_for_backward(grad_x, grad_w,
                              grad_b.to(bias.dtype) if grad_b is not None else None)
        # Mean over valid targets; all ignored gives nan, as torch.nn.functional does.
        return loss.sum() / n_valid if n_valid else loss.sum() * float("nan")

    @staticmethod
    @timed("linear_cross_entropy.backward")
    def backward(ctx, grad_loss):
        grads = hand_over(ctx, "linear_cross_entropy", grad_loss, *ctx.saved_tensors)
        return (*grads, None, None, None)


@timed("linear_cross_entropy.forward")
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         rows_per_chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of x (tokens, hidden) through an LM head weight (vocab, hidden)
    and optional bias (vocab,) against targets (tokens,); fused and chunked on CUDA."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: x {tuple(x.shape)} must be (tokens, hidden) "
                         f"and weight {tuple(weight.shape)} (vocab, hidden)")
    if targets.shape != x.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} "
                         f"{targets.dtype} must be (tokens,) integer class indices")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} must be (vocab,)")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"linear_cross_entropy: x, weight and bias must share a dtype, got "
                         f"{x.dtype}, {weight.dtype}"
                         + (f", {bias.dtype}" if bias is not None else ""))
    vocab = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: a target is outside [0, {vocab}) and is "
                         f"not ignore_index {ignore_index}")
    if rows_per_chunk is not None and rows_per_chunk < 1:
        raise ValueError(f"linear_cross_entropy: rows_per_chunk must be ≥ 1, got "
                         f"{rows_per_chunk}")
    if use_triton(x, weight, bias, targets):
        if x.dtype in DTYPES:
            rows = rows_per_chunk or chunk_rows(x.shape[0], x.shape[1], vocab)
            return LinearCrossEntropyFunction.apply(x.contiguous(), weight, bias,
                                                    targets.contiguous(), ignore_index, rows)
        warn_once("linear_cross_entropy", f"dtype {x.dtype} is not one of fp32, bf16, fp16")
    return linear_cross_entropy_reference(x, weight, targets, bias, ignore_index)


class LinearCrossEntropyLoss(nn.Module):
    """An LM head (vocab x hidden, optional bias) whose forward returns the mean
    cross-entropy of its logits against targets, never materialising all of them."""

    def __init__(self, hidden: int, vocab: int, bias: bool = False, ignore_index: int = -100,
                 device=None, dtype=None):
        super().__init__()
        self.head = nn.Linear(hidden, vocab, bias=bias, device=device, dtype=dtype)
        self.ignore_index = ignore_index

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.head.weight,
                                    targets.reshape(-1), self.head.bias, self.ignore_index)
