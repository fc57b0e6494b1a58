"""RMSNorm's reference on CPU: it is what the Triton kernels are held to."""

import pytest
import torch

from mlpe.kernels import dispatch
from mlpe.kernels.rmsnorm import RMSNorm, rmsnorm, rmsnorm_reference


def test_reference_matches_torch_rms_norm():
    x, w = torch.randn(5, 37), torch.randn(37)
    expected = torch.nn.functional.rms_norm(x, (37,), w, eps=1e-6)
    torch.testing.assert_close(rmsnorm_reference(x, w, 1e-6), expected)


def test_residual_variant_normalises_the_sum_and_returns_it():
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    y, h = rmsnorm_reference(x, w, 1e-6, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, rmsnorm_reference(x + r, w, 1e-6))


def test_reference_gradients_in_fp64():
    x = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: rmsnorm_reference(a, c, 1e-6, b), (x, r, w))


def test_module_on_cpu_uses_the_reference_and_learns():
    norm = RMSNorm(16)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y, h = norm(x, torch.zeros_like(x))
    (y.sum() + h.sum()).backward()
    assert norm.weight.grad is not None and x.grad.shape == x.shape
    assert repr(norm) == "RMSNorm(16, eps=1e-06)"


def test_bad_shapes_name_the_constraint():
    with pytest.raises(ValueError, match="last dimension of x is 8"):
        rmsnorm(torch.randn(2, 8), torch.ones(9))
    with pytest.raises(ValueError, match="residual"):
        rmsnorm(torch.randn(2, 8), torch.ones(8), residual=torch.randn(2, 7))


def test_backend_choice_is_validated(monkeypatch):
    dispatch.backend.cache_clear()
    monkeypatch.setenv("MLPE_KERNELS", "fast")
    with pytest.raises(ValueError, match="expected one of auto, triton, reference"):
        dispatch.backend()
    dispatch.backend.cache_clear()
    monkeypatch.setenv("MLPE_KERNELS", "reference")
    assert dispatch.backend() == "reference" and not dispatch.use_triton(torch.zeros(1))
    dispatch.backend.cache_clear()
