"""LayerNorm's reference on CPU and its module."""

import pytest
import torch

from mlpe.kernels.layernorm import LayerNorm, layernorm, layernorm_reference


def test_reference_matches_torch_layer_norm():
    x, w, b = torch.randn(6, 45), torch.randn(45), torch.randn(45)
    torch.testing.assert_close(layernorm_reference(x, w, b),
                               torch.nn.functional.layer_norm(x, (45,), w, b))


def test_reference_gradients_in_fp64():
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layernorm_reference, (x, w, b))


def test_module_like_torch_layer_norm():
    ours, theirs = LayerNorm(24), torch.nn.LayerNorm(24)
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(ours(x), theirs(x))
    assert LayerNorm(24, bias=False).bias is None


def test_bad_weight_shape_names_the_constraint():
    with pytest.raises(ValueError, match=r"must both be \(8,\)"):
        layernorm(torch.randn(2, 8), torch.ones(8), torch.zeros(9))
