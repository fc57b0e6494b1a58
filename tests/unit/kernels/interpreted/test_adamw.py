"""The fused AdamW kernel run on the CPU by Triton's interpreter against the reference: odd
sizes (a partial block, one element, several blocks), several tensors per call, weight
decay and maximize."""

import pytest
import torch

from mlpe.kernels.adamw import adamw_reference, adamw_triton
from mlpe.kernels.tolerances import TOLERANCES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("weight_decay", "maximize"), [(0.0, False), (0.1, True)])
def test_adamw_kernel_matches_the_reference(dtype, weight_decay, maximize):
    torch.manual_seed(0)
    params = [torch.randn(n).to(dtype) for n in (37, 1, 4099)]
    runs = [([p.clone() for p in params], [torch.zeros(p.shape) for p in params],
             [torch.zeros(p.shape) for p in params]) for _ in range(2)]
    for step in range(1, 4):
        grads = [torch.randn(p.shape).to(dtype) for p in params]
        for update, (p, m, v) in zip((adamw_triton, adamw_reference), runs, strict=True):
            update(p, grads, m, v, step, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                   weight_decay=weight_decay, maximize=maximize)
        (p, m, v), (ref_p, ref_m, ref_v) = runs
        for got, want in zip(p, ref_p, strict=True):
            torch.testing.assert_close(got, want, atol=TOLERANCES[dtype][0],
                                       rtol=TOLERANCES[dtype][1])
            # The interpreter rounds fp32 -> bf16 toward zero (GPUs to nearest): restart every
            # step from the reference's parameters so that this does not add up over steps.
            got.copy_(want)
        for got, want in zip(m + v, ref_m + ref_v, strict=True):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=TOLERANCES[torch.float32][0],
                                       rtol=TOLERANCES[torch.float32][1])
