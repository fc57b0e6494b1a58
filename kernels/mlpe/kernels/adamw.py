"""AdamW's parameter update, fused: one read of p, g, m, v and one write of p, m, v.

torch.optim.AdamW (foreach) runs the update as a chain of multi-tensor ops: decay p, lerp m,
update v, sqrt, divide, add eps, addcdiv into p, each a full pass over memory with
temporaries in between. The Triton kernel does the whole update in registers in a single
pass per tensor; the bias corrections are computed once on the host and passed as scalars.

The moments (m, v) are kept in fp32 whatever the parameter dtype, and the math runs in fp32;
bf16/fp16 parameters are rounded once, on their store (torch.optim.AdamW keeps its moments in
the parameter dtype).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch

from mlpe.kernels.dispatch import use_triton, warn_once
from mlpe.kernels.profile import timed

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is used
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024
MOMENTS = ("exp_avg", "exp_avg_sq")


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """fp32 moments for fp32/bf16/fp16 parameters (fp64 keeps fp64)."""
    return torch.promote_types(param.dtype, torch.float32)


def _host_scalars(step: int, lr: float, beta1: float, beta2: float,
                  weight_decay: float) -> tuple[float, float, float]:
    """(decay factor, step size, sqrt of the second bias correction), as torch computes them:
    in Python floats, from the step number after its increment."""
    if step < 1:
        raise ValueError(f"adamw: step must be >= 1 (the count after this update), got {step}")
    return 1 - lr * weight_decay, lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5


def adamw_reference(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                    step: int, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, maximize: bool = False) -> None:
    """One AdamW step in place, op for op as torch.optim.AdamW's single-tensor path, with the
    math in the moments' dtype (fp32 for bf16/fp16 parameters)."""
    decay, step_size, bc2_sqrt = _host_scalars(step, lr, beta1, beta2, weight_decay)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        work = p.to(m.dtype)  # p itself when already in the math dtype
        g = g.to(m.dtype)
        if maximize:
            g = -g  # a new tensor: the caller's gradient is left alone
        work.mul_(decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        work.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
        if work is not p:
            p.copy_(work)


if triton is not None:
    @triton.jit
    def _adamw_kernel(P, G, M, V, n, decay, one_minus_beta1, beta2, one_minus_beta2,
                      step_size, bc2_sqrt, eps, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        p = tl.load(P + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(M + offsets, mask=mask, other=0.0)
        v = tl.load(V + offsets, mask=mask, other=0.0)
        if MAXIMIZE:
            g = -g
        p = p * decay
        m = m + one_minus_beta1 * (g - m)  # torch's lerp for a weight below 0.5
        v = v * beta2 + one_minus_beta2 * g * g
        # Correctly rounded sqrt and division (Triton's defaults are approximate on GPUs):
        # free in a memory-bound kernel, and they keep us within rounding of PyTorch.
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(P + offsets, p.to(P.dtype.element_ty), mask=mask)
        tl.store(M + offsets, m, mask=mask)
        tl.store(V + offsets, v, mask=mask)


def adamw_triton(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                 step: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, maximize: bool = False) -> None:
    """adamw_reference's update with one fused kernel launch per tensor. p and g: contiguous,
    fp32/bf16/fp16; m and v: contiguous fp32, of p's shape."""
    decay, step_size, bc2_sqrt = _host_scalars(step, lr, beta1, beta2, weight_decay)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        # The kernel walks flat memory: anything else would silently mix up elements.
        if not (p.shape == g.shape == m.shape == v.shape
                and all(t.is_contiguous() for t in (p, g, m, v))
                and p.dtype in DTYPES and g.dtype in DTYPES
                and m.dtype == v.dtype == torch.float32):
            raise ValueError(f"adamw_triton: needs contiguous p, g, m, v of one shape, p and g "
                             f"fp32/bf16/fp16, m and v fp32; got p {p.dtype} "
                             f"{tuple(p.shape)}, g {g.dtype} {tuple(g.shape)}, m {m.dtype}, "
                             f"v {v.dtype}")
        n = p.numel()
        if n:
            _adamw_kernel[(triton.cdiv(n, BLOCK),)](
                p, g, m, v, n, decay, 1 - beta1, beta2, 1 - beta2, step_size, bc2_sqrt, eps,
                MAXIMIZE=maximize, BLOCK=BLOCK, num_warps=4)


def _fusable(p: torch.Tensor, g: torch.Tensor, state: dict) -> bool:
    if not use_triton(p, g):
        return False
    if p.dtype not in DTYPES or g.dtype not in DTYPES:
        warn_once("adamw", f"dtype {p.dtype} (grad {g.dtype}) is not one of fp32, bf16, fp16")
        return False
    if not all(t.is_contiguous() for t in (p, g, state["exp_avg"], state["exp_avg_sq"])):
        warn_once("adamw", "a parameter, its gradient or its state is not contiguous")
        return False
    return True


class FusedAdamW(torch.optim.Optimizer):
    """Drop-in for torch.optim.AdamW (no amsgrad) with the fused update on CUDA.

    State per parameter: "step" (a Python int: the number of updates made), "exp_avg" and
    "exp_avg_sq" (fp32 for fp32/bf16/fp16 parameters).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, maximize: bool = False, amsgrad: bool = False):
        # amsgrad is accepted only so that code passing amsgrad=False works unchanged.
        if amsgrad:
            raise ValueError("FusedAdamW: amsgrad=True is not supported; use "
                             "torch.optim.AdamW(amsgrad=True)")
        if not lr >= 0:
            raise ValueError(f"FusedAdamW: lr must be >= 0, got {lr}")
        for i, beta in enumerate(betas):
            if not 0 <= beta < 1:
                raise ValueError(f"FusedAdamW: betas[{i}] must be in [0, 1), got {beta}")
        if not eps >= 0:
            raise ValueError(f"FusedAdamW: eps must be >= 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"FusedAdamW: weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "maximize": maximize}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved without the flag
            group.setdefault("maximize", False)

    @torch.no_grad()
    @timed("adamw.step", device_of=lambda args: args[0].param_groups[0]["params"][0].device)
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("amsgrad"):  # e.g. a group loaded from torch.optim.AdamW
                raise ValueError("FusedAdamW: amsgrad=True is not supported")
            beta1, beta2 = group["betas"]
            hyper = {"lr": float(group["lr"]), "beta1": beta1, "beta2": beta2,
                     "eps": group["eps"], "weight_decay": group["weight_decay"],
                     "maximize": group["maximize"]}
            # Tensors that share a step number share the host scalars: batch them by it.
            batches = {True: defaultdict(list), False: defaultdict(list)}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided:  # COO, CSR, ...: sparse
                    raise RuntimeError(f"FusedAdamW does not support sparse gradients ({g.layout})")
                if p.is_complex():
                    raise RuntimeError("FusedAdamW does not support complex parameters")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for key in MOMENTS:
                        state[key] = torch.zeros_like(p, dtype=state_dtype(p),
                                                      memory_format=torch.preserve_format)
                # int(): a 0-dim tensor when the state came from torch.optim.AdamW
                state["step"] = int(state["step"]) + 1
                batch = batches[_fusable(p, g, state)][state["step"]]
                batch.append((p, g, state["exp_avg"], state["exp_avg_sq"]))
            for fused, by_step in batches.items():
                update = adamw_triton if fused else adamw_reference
                for step, tensors in by_step.items():
                    ps, gs, ms, vs = map(list, zip(*tensors, strict=True))
                    update(ps, gs, ms, vs, step, **hyper)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # Optimizer.load_state_dict casts floating state to the parameter's dtype, which would
        # round a bf16/fp16 parameter's fp32 moments: put the saved ones back in their dtype.
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params, strict=True):
            for key in MOMENTS:
                if key in saved.get(i, {}):
                    self.state[p][key] = saved[i][key].to(device=p.device, dtype=state_dtype(p))
