"""Every Triton kernel, forward and backward, run on the CPU by Triton's interpreter
(TRITON_INTERPRET=1) against its reference: the kernels' code is tested without a GPU.
Small shapes only (the interpreter is slow); the GPU tests cover the rest."""

import os
import subprocess
import sys

import pytest

CHECK = """
import torch
from mlpe.kernels.cross_entropy import CrossEntropyFunction, cross_entropy_reference
from mlpe.kernels.linear_cross_entropy import (LinearCrossEntropyFunction,
                                               linear_cross_entropy_reference)
from mlpe.kernels.layernorm import LayerNormFunction, layernorm_reference
from mlpe.kernels.rmsnorm import RMSNormFunction, rmsnorm_reference
from mlpe.kernels.rope import RoPEFunction, rope_cache, rope_reference
from mlpe.kernels.swiglu import SwiGLUFunction, swiglu_reference

def compare(fused, reference, inputs):
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

torch.manual_seed(0)
op = "{op}"
if op == "rmsnorm":
    x, w, r = torch.randn(5, 37), torch.randn(37), torch.randn(5, 37)
    compare(lambda a, b: RMSNormFunction.apply(a, b, None, 1e-6),
            lambda a, b: rmsnorm_reference(a, b, 1e-6), [x, w])
    compare(lambda a, b, c: RMSNormFunction.apply(a, b, c, 1e-6),
            lambda a, b, c: rmsnorm_reference(a, b, 1e-6, c), [x, w, r])
elif op == "layernorm":
    x, w, b = 2 + torch.randn(6, 29), torch.randn(29), torch.randn(29)
    compare(lambda a, c, d: LayerNormFunction.apply(a, c, d, 1e-5), layernorm_reference,
            [x, w, b])
elif op == "swiglu":
    compare(SwiGLUFunction.apply, swiglu_reference, [torch.randn(3, 41), torch.randn(3, 41)])
elif op == "rope":
    cos, sin = rope_cache(5, 12)
    compare(lambda q, k: RoPEFunction.apply(q, k, cos, sin),
            lambda q, k: rope_reference(q, k, cos, sin),
            [torch.randn(2, 5, 4, 12), torch.randn(2, 5, 2, 12)])
elif op == "cross_entropy":
    targets = torch.tensor([3, -100, 0, 9000, 17])
    compare(lambda z: CrossEntropyFunction.apply(z, targets, -100),
            lambda z: cross_entropy_reference(z, targets), [torch.randn(5, 9001)])
    z = torch.randn(5, 9001, requires_grad=True)
    loss = CrossEntropyFunction.apply(z, targets, -100)
    loss.backward(retain_graph=True)
    try:  # the gradient was handed over: a second backward is refused, not silently wrong
        loss.backward()
        raise AssertionError("second backward accepted")
    except RuntimeError as err:
        assert "second time" in str(err), err
elif op == "linear_cross_entropy":  # 7 tokens in chunks of 2 (the last one short), a bias
    targets = torch.tensor([3, -100, 0, 300, 17, 5, 299])
    compare(lambda x, w, b: LinearCrossEntropyFunction.apply(x, w, b, targets, -100, 2),
            lambda x, w, b: linear_cross_entropy_reference(x, w, targets, b),
            [torch.randn(7, 24), torch.randn(301, 24) / 5, torch.randn(301)])
print("ok")
"""


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm", "swiglu", "rope", "cross_entropy",
                                "linear_cross_entropy"])
def test_kernel_matches_reference_in_the_interpreter(op):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK.replace("{op}", op)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
