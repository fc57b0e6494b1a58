"""The fused LM head + loss: its reference, chunk sizing, module and input checks on CPU
(the chunked Triton path runs in the interpreter test and on a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from mlpe.kernels.linear_cross_entropy import (
    LinearCrossEntropyLoss,
    chunk_rows,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)


def test_reference_is_linear_then_cross_entropy():
    x, w, b = torch.randn(6, 8), torch.randn(50, 8), torch.randn(50)
    t = torch.tensor([1, 49, -100, 0, 7, 7])
    want = F.cross_entropy(x @ w.T + b, t)
    torch.testing.assert_close(linear_cross_entropy_reference(x, w, t, b), want)
    torch.testing.assert_close(linear_cross_entropy(x, w, t, b), want)


def test_reference_gradients_in_fp64():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 10, -100, 3])
    assert torch.autograd.gradcheck(lambda a, c: linear_cross_entropy_reference(a, c, t),
                                    (x, w))


@pytest.mark.parametrize(("rows", "hidden", "vocab", "want"), [
    (8192, 4096, 131072, 256),   # a chunk's logits as large as x
    (8192, 4096, 1000, 8192),    # small vocabulary: one chunk
    (1, 64, 256000, 1),
    (100, 64, 256, 16),          # 25 rounded down to a power of two
])
def test_chunk_logits_are_no_larger_than_x(rows, hidden, vocab, want):
    got = chunk_rows(rows, hidden, vocab)
    assert got == want
    assert got == 1 or got * vocab <= rows * hidden


def test_module_flattens_batch_and_sequence():
    torch.manual_seed(0)
    loss_fn = LinearCrossEntropyLoss(8, 30, bias=True)
    x, t = torch.randn(2, 3, 8), torch.randint(0, 30, (2, 3))
    want = F.cross_entropy(loss_fn.head(x).reshape(-1, 30), t.reshape(-1))
    torch.testing.assert_close(loss_fn(x, t), want)


@pytest.mark.parametrize(("args", "message"), [
    ((torch.randn(3, 4), torch.randn(9, 5), torch.zeros(3, dtype=torch.long)), "hidden"),
    ((torch.randn(3, 4), torch.randn(9, 4), torch.zeros(2, dtype=torch.long)), "targets"),
    ((torch.randn(3, 4), torch.randn(9, 4), torch.zeros(3)), "integer class indices"),
    ((torch.randn(3, 4), torch.randn(9, 4), torch.tensor([0, 9, 1])), r"outside \[0, 9\)"),
    ((torch.randn(3, 4), torch.randn(9, 4).double(), torch.zeros(3, dtype=torch.long)),
     "share a dtype"),
])
def test_bad_inputs_name_the_constraint(args, message):
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(*args)


def test_bad_bias_and_chunk_are_refused():
    x, w, t = torch.randn(3, 4), torch.randn(9, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"bias \(8,\) must be \(vocab,\)"):
        linear_cross_entropy(x, w, t, torch.zeros(8))
    with pytest.raises(ValueError, match="rows_per_chunk must be ≥ 1"):
        linear_cross_entropy(x, w, t, rows_per_chunk=0)
