"""Softmax cross-entropy with integer targets, mean over the targets not ignored.

PyTorch's eager path upcasts the logits, materialises log-softmax and then a gradient,
each as large as the logits (at a 128k vocabulary that is the biggest tensor of a step).
The Triton kernel makes one pass over each row for an online max and sum of exponentials,
then a second that writes the gradient straight away (softmax - one-hot, scaled), so
backward has nothing left to compute and no fp32 copy of the logits is ever held.
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
BLOCK = 4096


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = -100) -> torch.Tensor:
    acc = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(acc), targets, ignore_index=ignore_index)


if triton is not None:
    @triton.jit
    def _loss_and_grad_kernel(LOGITS, TARGETS, LOSS, GRAD, stride_l, stride_g, n_cols,
                              ignore_index, scale, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(TARGETS + row)
        valid = target != ignore_index
        logits = LOGITS + row * stride_l
        # Pass 1: running max and sum of exp(x - max), one block at a time.
        m = tl.full([], float("-inf"), tl.float32)
        d = tl.full([], 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(logits + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        safe_target = tl.where(valid, target, 0)
        x_target = tl.load(logits + safe_target).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, tl.log(d) + m - x_target, 0.0))
        # Pass 2: the gradient of the mean loss, (softmax - one-hot) / n_valid.
        g_scale = tl.where(valid, scale, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(logits + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - m) / d - tl.where(cols == safe_target, 1.0, 0.0)
            tl.store(GRAD + row * stride_g + cols, (g * g_scale).to(GRAD.dtype.element_ty),
                     mask=mask)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        n_rows, n_cols = logits.shape
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        n_valid = int((targets != ignore_index).sum())
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits)
        if n_rows:
            _loss_and_grad_kernel[(n_rows,)](
                logits, targets, loss, grad, logits.stride(0), grad.stride(0), n_cols,
                ignore_index, 1.0 / max(n_valid, 1), BLOCK=min(BLOCK,
                                                               triton.next_power_of_2(n_cols)),
                num_warps=8)
        ctx.save_for_backward(grad)
        # Mean over valid targets; all ignored gives nan, as torch.nn.functional does.
        return loss.sum() / n_valid if n_valid else loss.sum() * float("nan")

    @staticmethod
    @timed("cross_entropy.backward")
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (*hand_over(ctx, "cross_entropy", grad_loss, grad), None, None)


def hand_over(ctx, op: str, grad_loss: torch.Tensor, *grads: torch.Tensor | None):
    """The gradients computed in forward, scaled in place by the upstream gradient (no
    second logits-sized tensor). They are handed over once: autograd may keep them as the
    inputs' .grad, so a second backward (retain_graph) could not scale them again."""
    if getattr(ctx, "handed_over", False):
        raise RuntimeError(f"{op}: backward a second time through the same call is not "
                           f"supported (its gradient is computed in forward and handed "
                           f"over once); use {op}_reference for retain_graph")
    ctx.handed_over = True
    if not bool(grad_loss == 1):  # the usual case (loss.backward()) multiplies nothing
        for g in grads:
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
    return tuple(grads)


@timed("cross_entropy.forward")
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of (tokens, vocab) logits against (tokens,) class indices."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} must be (tokens, "
                         f"vocab) and targets {tuple(targets.shape)} must be (tokens,)")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: targets must be integer class indices, got "
                         f"{targets.dtype}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= logits.shape[1]))
    if bool(bad.any()):
        raise ValueError(f"cross_entropy: a target is outside [0, {logits.shape[1]}) and "
                         f"is not ignore_index {ignore_index}")
    if use_triton(logits, targets):
        if logits.dtype in DTYPES:
            return CrossEntropyFunction.apply(logits, targets.contiguous(), ignore_index)
        warn_once("cross_entropy", f"dtype {logits.dtype} is not one of fp32, bf16, fp16")
    return cross_entropy_reference(logits, targets, ignore_index)


class CrossEntropyLoss(nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss(ignore_index=…) with mean reduction."""

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets, self.ignore_index)
