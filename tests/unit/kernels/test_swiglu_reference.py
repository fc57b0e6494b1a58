"""SwiGLU's reference on CPU and its module."""

import pytest
import torch
import torch.nn.functional as F

from mlpe.kernels.swiglu import SwiGLUMLP, swiglu, swiglu_reference


def test_reference_is_silu_gate_times_up():
    gate, up = torch.randn(4, 33), torch.randn(4, 33)
    torch.testing.assert_close(swiglu_reference(gate, up), F.silu(gate) * up)


def test_reference_gradients_in_fp64():
    gate = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_reference, (gate, up))


def test_mlp_module_shapes_and_gradients():
    mlp = SwiGLUMLP(16, 40)
    x = torch.randn(2, 5, 16, requires_grad=True)
    mlp(x).sum().backward()
    assert x.grad.shape == x.shape and mlp.gate_proj.weight.grad is not None


def test_mismatched_inputs_name_the_constraint():
    with pytest.raises(ValueError, match="same shape and dtype"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
