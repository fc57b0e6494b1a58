"""Cross-entropy's reference and its input checks, on CPU."""

import pytest
import torch
import torch.nn.functional as F

from mlpe.kernels.cross_entropy import CrossEntropyLoss, cross_entropy, cross_entropy_reference


def test_reference_is_torch_cross_entropy_with_ignored_targets():
    logits, targets = torch.randn(6, 50), torch.tensor([1, -100, 7, 49, 0, -100])
    torch.testing.assert_close(cross_entropy_reference(logits, targets),
                               F.cross_entropy(logits, targets))
    torch.testing.assert_close(CrossEntropyLoss()(logits, targets),
                               F.cross_entropy(logits, targets))


def test_reference_gradients_in_fp64():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 8, -100, 3])
    assert torch.autograd.gradcheck(lambda z: cross_entropy_reference(z, targets), (logits,))


def test_bad_targets_are_refused_by_name():
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        cross_entropy(torch.randn(2, 5), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="integer class indices"):
        cross_entropy(torch.randn(2, 5), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"must be \(tokens, vocab\)"):
        cross_entropy(torch.randn(2, 3, 5), torch.tensor([1, 2]))
