"""The AdamW reference and FusedAdamW on CPU (reference path) against torch.optim.AdamW."""

import io

import pytest
import torch

from mlpe.kernels.adamw import FusedAdamW, adamw_reference, adamw_triton

SHAPES = [(37,), (1,), (5, 7), (3, 4, 9)]
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8}


def _params(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(shape).to(dtype) for shape in SHAPES]


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-wd", "wd"])
def test_reference_equals_torch_adamw(weight_decay, maximize):
    params, ours = _params(), _params()
    torch_opt = torch.optim.AdamW(params, weight_decay=weight_decay, maximize=maximize, **HYPER)
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    for step in range(1, 6):
        _set_grads(params, step)
        torch_opt.step()
        adamw_reference(ours, [p.grad for p in params], m, v, step, lr=HYPER["lr"], beta1=0.9,
                        beta2=0.99, eps=1e-8, weight_decay=weight_decay, maximize=maximize)
        for want, got in zip(params, ours, strict=True):
            assert torch.equal(got, want)  # op for op the same: bit-exact
    for p, exp_avg in zip(params, m, strict=True):
        assert torch.equal(torch_opt.state[p]["exp_avg"], exp_avg)


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_fused_adamw_on_cpu_equals_torch_adamw_with_groups(maximize):
    params, ours = _params(), _params()

    def groups(ps):  # two groups with their own lr and weight decay
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]

    torch_opt = torch.optim.AdamW(groups(params), weight_decay=0.05, maximize=maximize, **HYPER)
    fused = FusedAdamW(groups(ours), weight_decay=0.05, maximize=maximize, **HYPER)
    for step in range(1, 8):
        _set_grads(params, step)
        if step % 3 == 0:  # a parameter without a gradient falls behind in its step count
            params[1].grad = None
        for p, q in zip(params, ours, strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        torch_opt.step()
        fused.step()
        for want, got in zip(params, ours, strict=True):
            assert torch.equal(got, want)
    assert fused.state[ours[1]]["step"] == 5 and fused.state[ours[0]]["step"] == 7


def test_closure_is_called_with_grad_enabled():
    p = torch.randn(5, requires_grad=True)
    opt = FusedAdamW([p])

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure) is not None and opt.state[p]["step"] == 1


def _checkpoint(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_continues_bit_for_bit(dtype):
    params = _params(dtype)
    opt = FusedAdamW(params, weight_decay=0.1, **HYPER)
    for step in range(1, 4):
        _set_grads(params, step)
        opt.step()
    saved = _checkpoint({"params": params, "optimizer": opt.state_dict()})

    resumed = saved["params"]
    resumed_opt = FusedAdamW(resumed, lr=0.5)  # hyperparameters come from the checkpoint
    resumed_opt.load_state_dict(saved["optimizer"])
    for p in resumed:
        assert resumed_opt.state[p]["exp_avg"].dtype == torch.float32  # not cast to bf16
    for step in range(4, 7):
        for run, optimizer in ((params, opt), (resumed, resumed_opt)):
            _set_grads(run, step)
            optimizer.step()
    for want, got in zip(params, resumed, strict=True):
        assert torch.equal(got, want)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(resumed_opt.state[got][key]),
                               torch.as_tensor(opt.state[want][key]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_keep_fp32_state(dtype):
    """The moments see only the gradients, so they equal those of torch.optim.AdamW run on fp32
    copies of the parameters; the parameters, rounded every step, stay within rounding plus
    at most about one update (lr) per step of that fp32 run."""
    steps, lr = 10, 1e-3
    params = _params(dtype)
    master = [p.float() for p in params]
    opt = FusedAdamW(params, lr=lr, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(master, lr=lr, weight_decay=0.1)
    for step in range(1, steps + 1):
        _set_grads(params, step)
        for p, q in zip(params, master, strict=True):
            q.grad = p.grad.float()
        opt.step()
        torch_opt.step()
    for p, q in zip(params, master, strict=True):
        state = opt.state[p]
        assert p.dtype == dtype and state["exp_avg"].dtype == state["exp_avg_sq"].dtype \
            == torch.float32
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], torch_opt.state[q][key])
        torch.testing.assert_close(p.float(), q, atol=steps * lr, rtol=1e-2)


def test_fp64_params_keep_fp64_state_and_match_torch():
    params, ours = _params(torch.float64), _params(torch.float64)
    torch_opt, fused = torch.optim.AdamW(params, **HYPER), FusedAdamW(ours, **HYPER)
    for step in range(1, 4):
        _set_grads(params, step)
        for p, q in zip(params, ours, strict=True):
            q.grad = p.grad.clone()
        torch_opt.step()
        fused.step()
    for want, got in zip(params, ours, strict=True):
        assert torch.equal(got, want) and fused.state[got]["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"lr": -1e-3}, "lr"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"amsgrad": True}, "amsgrad"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FusedAdamW([torch.zeros(3, requires_grad=True)], **kwargs)


def test_sparse_gradients_are_refused():
    p = torch.zeros(4, 3, requires_grad=True)
    p.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (4, 3), check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse"):
        FusedAdamW([p]).step()


def test_reference_refuses_step_zero():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="step"):
        adamw_reference([p], [p.clone()], [p.clone()], [p.clone()], 0, lr=1e-3, beta1=0.9,
                        beta2=0.999, eps=1e-8, weight_decay=0.0)


def test_launcher_refuses_what_the_kernel_cannot_walk():
    p = torch.zeros(4, 6)[:, :3]  # the kernel walks flat memory: a strided view would mix rows
    m, v = torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="contiguous"):
        adamw_triton([p], [torch.zeros(4, 3)], [m], [v], 1, lr=1e-3, beta1=0.9, beta2=0.999,
                     eps=1e-8, weight_decay=0.0)
