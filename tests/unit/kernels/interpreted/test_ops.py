"""Every Triton kernel, forward and backward, run on the CPU by Triton's interpreter against
its reference: the kernels' code is tested without a GPU. Small shapes only (the
interpreter is slow); the GPU tests cover the rest."""

import pytest
import torch

from mlpe.kernels.cross_entropy import CrossEntropyFunction, cross_entropy_reference
from mlpe.kernels.layernorm import LayerNormFunction, layernorm_reference
from mlpe.kernels.linear_cross_entropy import (
    LinearCrossEntropyFunction,
    linear_cross_entropy_reference,
)
from mlpe.kernels.rmsnorm import RMSNormFunction, rmsnorm_reference
from mlpe.kernels.rope import RoPEFunction, rope_cache, rope_reference
from mlpe.kernels.swiglu import SwiGLUFunction, swiglu_reference


def compare(fused, reference, inputs):
    """Outputs and input gradients (for the same random upstream gradient) agree."""
    leaves = [t.requires_grad_() for t in inputs if t is not None and t.is_floating_point()]
    results = []
    for fn in (fused, reference):
        out = fn(*inputs)
        outs = list(out) if isinstance(out, tuple) else [out]
        torch.manual_seed(1)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
        results.append(outs + [t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def test_rmsnorm_with_and_without_the_residual():
    x, w, r = torch.randn(5, 37), torch.randn(37), torch.randn(5, 37)
    compare(lambda a, b: RMSNormFunction.apply(a, b, None, 1e-6),
            lambda a, b: rmsnorm_reference(a, b, 1e-6), [x, w])
    compare(lambda a, b, c: RMSNormFunction.apply(a, b, c, 1e-6),
            lambda a, b, c: rmsnorm_reference(a, b, 1e-6, c), [x, w, r])


def test_layernorm():
    x, w, b = 2 + torch.randn(6, 29), torch.randn(29), torch.randn(29)
    compare(lambda a, c, d: LayerNormFunction.apply(a, c, d, 1e-5), layernorm_reference,
            [x, w, b])


def test_swiglu():
    compare(SwiGLUFunction.apply, swiglu_reference, [torch.randn(3, 41), torch.randn(3, 41)])


def test_rope_with_grouped_kv_heads():
    cos, sin = rope_cache(5, 12)
    compare(lambda q, k: RoPEFunction.apply(q, k, cos, sin),
            lambda q, k: rope_reference(q, k, cos, sin),
            [torch.randn(2, 5, 4, 12), torch.randn(2, 5, 2, 12)])


def test_cross_entropy_and_its_one_time_gradient_hand_over():
    targets = torch.tensor([3, -100, 0, 9000, 17])
    compare(lambda z: CrossEntropyFunction.apply(z, targets, -100),
            lambda z: cross_entropy_reference(z, targets), [torch.randn(5, 9001)])
    z = torch.randn(5, 9001, requires_grad=True)
    loss = CrossEntropyFunction.apply(z, targets, -100)
    loss.backward(retain_graph=True)
    # The gradient was handed over: a second backward is refused, not silently wrong.
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_linear_cross_entropy_in_chunks_with_a_short_last_one_and_a_bias():
    targets = torch.tensor([3, -100, 0, 300, 17, 5, 299])  # 7 tokens, chunks of 2
    compare(lambda x, w, b: LinearCrossEntropyFunction.apply(x, w, b, targets, -100, 2),
            lambda x, w, b: linear_cross_entropy_reference(x, w, targets, b),
            [torch.randn(7, 24), torch.randn(301, 24) / 5, torch.randn(301)])
