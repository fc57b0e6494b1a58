"""Triton kernels against their references on a GPU (skipped without CUDA)."""

import logging

import pytest
import torch

from mlpe.kernels import dispatch
from mlpe.kernels.rmsnorm import MAX_COLS, rmsnorm, rmsnorm_reference
from mlpe.kernels.tolerances import GRAD_TOLERANCES, TOLERANCES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]
SHAPES = [(1, 7), (3, 1000), (17, 4096), (5, 3, 768), (2, 32768), (4099, 256)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, residual):
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) if residual else None
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(dtype).requires_grad_()
    return x, r, w


def _run(fn, x, r, w, seed_grads):
    out = fn(x, w, 1e-6, r)
    y, h = out if r is not None else (out, None)
    loss = (y.float() * seed_grads[0]).sum()
    if h is not None:
        loss = loss + (h.float() * seed_grads[1]).sum()
    loss.backward()
    grads = [t.grad.clone() for t in (x, r, w) if t is not None]
    for t in (x, r, w):
        if t is not None:
            t.grad = None
    return [y, h] if h is not None else [y], grads


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rmsnorm_matches_reference(shape, dtype, residual):
    assert dispatch.use_triton(torch.zeros(1, device="cuda"))
    x, r, w = _inputs(shape, dtype, residual)
    seeds = (torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda"))
    outs, grads = _run(rmsnorm, x, r, w, seeds)
    ref_outs, ref_grads = _run(rmsnorm_reference, x, r, w, seeds)
    atol, rtol = TOLERANCES[dtype]
    for got, want in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    atol, rtol = GRAD_TOLERANCES[dtype]
    for got, want in zip(grads, ref_grads, strict=True):
        # The weight gradient sums over every row: compare relative to its scale.
        scale = max(1.0, want.float().abs().max().item()) if want.dim() == 1 else 1.0
        torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=atol,
                                   rtol=rtol)


def test_unsupported_input_falls_back_with_one_warning(caplog):
    dispatch.warn_once.cache_clear()
    x = torch.randn(2, 16, device="cuda", dtype=torch.float64)
    w = torch.ones(16, device="cuda", dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="mlpe.kernels"):
        for _ in range(3):
            torch.testing.assert_close(rmsnorm(x, w), rmsnorm_reference(x, w))
    assert caplog.text.count("is not one of fp32, bf16, fp16") == 1
    long_row = torch.randn(1, MAX_COLS + 1, device="cuda")
    torch.testing.assert_close(rmsnorm(long_row, torch.ones(MAX_COLS + 1, device="cuda")),
                               rmsnorm_reference(long_row, torch.ones(MAX_COLS + 1,
                                                                      device="cuda")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (3, 1000), (17, 11008), (2, 3, 14336), (4099, 256)],
                         ids=str)
def test_swiglu_matches_reference(shape, dtype):
    from mlpe.kernels.swiglu import swiglu, swiglu_reference

    torch.manual_seed(0)
    gate = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    up = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    results = []
    for fn in (swiglu, swiglu_reference):
        y = fn(gate, up)
        y.backward(dy)
        results.append((y, gate.grad.clone(), up.grad.clone()))
        gate.grad = up.grad = None
    atol, rtol = TOLERANCES[dtype]
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_swiglu_noncontiguous_inputs():
    from mlpe.kernels.swiglu import swiglu, swiglu_reference

    both = torch.randn(8, 2 * 96, device="cuda")
    gate, up = both[:, :96], both[:, 96:]  # views of one projection, as in fused layouts
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layernorm_matches_reference(shape, dtype, bias):
    from mlpe.kernels.layernorm import layernorm, layernorm_reference

    torch.manual_seed(0)
    x = (3 + torch.randn(shape, device="cuda")).to(dtype).requires_grad_()  # a mean to remove
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(shape[-1], device="cuda")).to(dtype).requires_grad_() if bias \
        else None
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    results = []
    for fn in (layernorm, layernorm_reference):
        y = fn(x, w, b)
        y.backward(dy)
        results.append([y] + [t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    (y, *grads), (ref_y, *ref_grads) = results
    torch.testing.assert_close(y, ref_y, atol=TOLERANCES[dtype][0], rtol=TOLERANCES[dtype][1])
    atol, rtol = GRAD_TOLERANCES[dtype]
    for got, want in zip(grads, ref_grads, strict=True):
        scale = max(1.0, want.float().abs().max().item()) if want.dim() == 1 else 1.0
        torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=atol,
                                   rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(1, 1, 1, 1, 64), (2, 17, 8, 2, 128), (1, 300, 32, 8, 128),
                                  (3, 5, 3, 3, 96), (2, 9, 5, 1, 2)], ids=str)
def test_rope_matches_reference(dims, dtype):
    from mlpe.kernels.rope import rope, rope_cache, rope_reference

    batch, seq, q_heads, k_heads, head_dim = dims
    torch.manual_seed(0)
    q = torch.randn(batch, seq, q_heads, head_dim, device="cuda", dtype=dtype,
                    requires_grad=True)
    k = torch.randn(batch, seq, k_heads, head_dim, device="cuda", dtype=dtype,
                    requires_grad=True)
    cos, sin = rope_cache(seq, head_dim, device="cuda")
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    results = []
    for fn in (rope, rope_reference):
        rq, rk = fn(q, k, cos, sin)
        torch.autograd.backward([rq, rk], [dq, dk])
        results.append((rq, rk, q.grad.clone(), k.grad.clone()))
        q.grad = k.grad = None
    atol, rtol = TOLERANCES[dtype]
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 10), (7, 1000), (33, 32000), (5, 128256), (3, 262144)],
                         ids=str)
def test_cross_entropy_matches_reference(shape, dtype):
    from mlpe.kernels.cross_entropy import cross_entropy, cross_entropy_reference

    torch.manual_seed(0)
    logits = (3 * torch.randn(shape, device="cuda")).to(dtype).requires_grad_()
    targets = torch.randint(0, shape[1], shape[:1], device="cuda")
    targets[1::3] = -100  # some ignored rows
    results = []
    for fn in (cross_entropy, cross_entropy_reference):
        loss = fn(logits, targets)
        (2.0 * loss).backward()  # a grad_output other than 1
        results.append((loss.float(), logits.grad.clone()))
        logits.grad = None
    (loss, grad), (ref_loss, ref_grad) = results
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "hidden", "vocab", "chunk"), [
    (1, 64, 1000, None), (37, 96, 5003, 8), (512, 1024, 32000, None), (130, 256, 50257, 64)],
    ids=str)
def test_linear_cross_entropy_matches_reference(tokens, hidden, vocab, chunk, dtype):
    from mlpe.kernels.linear_cross_entropy import (
        linear_cross_entropy,
        linear_cross_entropy_reference,
    )

    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda") / hidden**0.5).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(vocab, device="cuda")).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    targets[1::3] = -100
    results = []
    for fn in (lambda: linear_cross_entropy(x, w, targets, b, rows_per_chunk=chunk),
               lambda: linear_cross_entropy_reference(x, w, targets, b)):
        loss = fn()
        (2.0 * loss).backward()
        results.append([loss.float()] + [t.grad.float().clone() for t in (x, w, b)])
        for t in (x, w, b):
            t.grad = None
    atol, rtol = GRAD_TOLERANCES[dtype]
    for got, want in zip(*results, strict=True):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got / scale, want / scale, atol=atol, rtol=rtol)


def test_profiling_times_forward_and_backward_with_cuda_events():
    from mlpe.kernels import profile
    from mlpe.kernels.swiglu import swiglu

    gate = torch.randn(1024, 4096, device="cuda", requires_grad=True)
    up = torch.randn(1024, 4096, device="cuda", requires_grad=True)
    profile.report()
    with profile.profiling():
        for _ in range(2):
            swiglu(gate, up).sum().backward()
    got = profile.report()
    assert got["swiglu.forward"]["calls"] == 2 and got["swiglu.backward"]["calls"] == 2
    assert all(v["total_ms"] > 0 for v in got.values())
