"""FusedAdamW's Triton path against torch.optim.AdamW and the reference on a GPU (skipped
without CUDA)."""

import logging

import pytest
import torch

from mlpe.kernels import dispatch
from mlpe.kernels.adamw import FusedAdamW, adamw_reference
from mlpe.kernels.tolerances import TOLERANCES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]
SHAPES = [(1,), (37,), (4099,), (17, 4096), (3, 5, 768), (4099, 256)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEPS, LR = 10, 1e-3


def _run(make_optimizer, params, grads):
    optimizer = make_optimizer(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.to(p.dtype)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_adamw_matches_torch_adamw(shape, dtype, maximize):
    assert dispatch.use_triton(torch.zeros(1, device="cuda"))
    torch.manual_seed(0)
    init = torch.randn(shape, device="cuda")
    grads = [[torch.randn(shape, device="cuda").to(dtype)] for _ in range(STEPS)]
    kw = {"lr": LR, "weight_decay": 0.1, "maximize": maximize}

    fused = [init.to(dtype, copy=True)]  # copy: init must stay as it is for the others
    fused_opt = _run(lambda ps: FusedAdamW(ps, **kw), fused, grads)
    # torch.optim.AdamW on fp32 copies: the moments see only the (upcast) gradients, so they
    # must agree with ours at fp32 tolerance whatever the parameter dtype.
    master = [init.clone()]
    torch_opt = _run(lambda ps: torch.optim.AdamW(ps, **kw), master, grads)
    atol, rtol = TOLERANCES[torch.float32]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(fused_opt.state[fused[0]][key],
                                   torch_opt.state[master[0]][key], atol=atol, rtol=rtol)
    # bf16/fp16 parameters round on every store, the fp32 copy does not: they drift apart by
    # at most about one update (lr) per step, on top of the dtype's rounding.
    atol, rtol = TOLERANCES[dtype]
    drift = 0.0 if dtype == torch.float32 else STEPS * LR
    torch.testing.assert_close(fused[0].float(), master[0], atol=atol + drift, rtol=rtol)

    # The reference (same fp32 state, same rounding of the parameters): tight.
    reference, m, v = init.to(dtype, copy=True), torch.zeros_like(init), torch.zeros_like(init)
    for step, (g,) in enumerate(grads, start=1):
        adamw_reference([reference], [g], [m], [v], step, lr=LR, beta1=0.9, beta2=0.999,
                        eps=1e-8, weight_decay=0.1, maximize=maximize)
    torch.testing.assert_close(fused[0], reference, atol=atol, rtol=rtol)


def test_noncontiguous_and_fp64_params_fall_back_with_one_warning(caplog):
    dispatch.warn_once.cache_clear()
    torch.manual_seed(0)
    wide = torch.randn(8, 64, device="cuda")
    params = [wide[:, :32], torch.randn(5, device="cuda", dtype=torch.float64)]
    copies = [p.clone() for p in params]
    fused, torch_opt = FusedAdamW(params), torch.optim.AdamW(copies)
    with caplog.at_level(logging.WARNING, logger="mlpe.kernels"):
        for _ in range(3):
            for p, q in zip(params, copies, strict=True):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            fused.step()
            torch_opt.step()
    assert caplog.text.count("is not one of fp32, bf16, fp16") == 1
    assert caplog.text.count("not contiguous") == 1
    for got, want in zip(params, copies, strict=True):
        torch.testing.assert_close(got, want)
