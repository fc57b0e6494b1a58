"""RoPE's reference on CPU: a rotation per plane, checked against complex multiplication."""

import pytest
import torch

from mlpe.kernels.rope import RotaryEmbedding, rope, rope_cache, rope_reference


def test_reference_is_complex_rotation():
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    cos, sin = rope_cache(5, 8)
    rq, _ = rope_reference(q, k, cos, sin)
    z = torch.complex(q[..., :4], q[..., 4:]) * torch.polar(torch.ones(5, 4), torch.atan2(
        sin, cos))[None, :, None, :]
    torch.testing.assert_close(rq, torch.cat([z.real, z.imag], dim=-1))


def test_position_zero_is_unchanged_and_norms_are_kept():
    q, k = torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)
    cos, sin = rope_cache(3, 16)
    rq, rk = rope_reference(q, k, cos, sin)
    torch.testing.assert_close(rq[:, 0], q[:, 0])
    torch.testing.assert_close(rk.norm(dim=-1), k.norm(dim=-1))


def test_reference_gradients_in_fp64():
    q = torch.randn(1, 4, 2, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 4, 1, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cache(4, 6)
    assert torch.autograd.gradcheck(lambda a, b: rope_reference(a, b, cos, sin), (q, k))


def test_bad_shapes_name_the_constraint():
    cos, sin = rope_cache(4, 8)
    with pytest.raises(ValueError, match=r"\(batch, seq, heads, head_dim\)"):
        rope(torch.randn(4, 8), torch.randn(4, 8), cos, sin)
    with pytest.raises(ValueError, match=r"head_dim 7 must be even"):
        rope_cache(4, 7)
    with pytest.raises(ValueError, match="longer than max_seq 4"):
        RotaryEmbedding(8, 4)(torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8))
