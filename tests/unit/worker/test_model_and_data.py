"""The worker's GPT and its data on the CPU (reference ops)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlpe.worker.data import SyntheticTokens, TokenFile
from mlpe.worker.model import GPT, PRESETS, GPTConfig

TINY = GPTConfig(vocab=64, seq_len=16, layers=2, hidden=32, heads=4, kv_heads=2)


def test_loss_is_cross_entropy_of_the_logits():
    torch.manual_seed(0)
    model = GPT(TINY)
    x, y = SyntheticTokens(64, 16).batch(0, 3)
    logits = model(x)
    assert logits.shape == (3, 16, 64)
    torch.testing.assert_close(model(x, y), F.cross_entropy(logits.reshape(-1, 64),
                                                            y.reshape(-1)))


def test_full_recomputation_gives_the_same_gradients():
    x, y = SyntheticTokens(64, 16).batch(1, 2)
    grads = []
    for recompute in ("none", "full"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**TINY.__dict__, "recompute": recompute}))
        model(x, y).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_tied_head_shares_the_embedding():
    model = GPT(GPTConfig(**{**TINY.__dict__, "tied": True}))
    assert model.head.weight is model.embed.weight
    assert model.num_params() == GPT(TINY).num_params() - 64 * 32


def test_presets_are_valid_and_ordered_by_size():
    sizes = [GPT(PRESETS[name]).num_params() for name in ("tiny", "small")]
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden": 30}, "not divisible by model.heads"),
    ({"kv_heads": 3}, "not divisible by model.kv_heads"),
    ({"layers": 0}, r"model.layers must be ≥ 1"),
    ({"hidden": 24, "heads": 8, "kv_heads": 8}, "must be even"),
    ({"recompute": "some"}, "model.recompute must be one of"),
])
def test_bad_config_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY.__dict__, **change})


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="seq ≤ 16"):
        GPT(TINY)(torch.zeros(1, 17, dtype=torch.long))


def test_synthetic_batches_depend_only_on_their_index():
    data = SyntheticTokens(100, 12, seed=3)
    a, b = data.batch(7, 4), SyntheticTokens(100, 12, seed=3).batch(7, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(data.batch(8, 4)[0], a[0])
    x, y = a
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 100
    follows = (5 * x + 3) % 100 == y
    assert 0.8 < follows.float().mean() < 1.0  # mostly the rule, sometimes noise


def test_token_file_windows_and_errors(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype="<u2").tofile(path)
    x, y = TokenFile(path, vocab=1000, seq_len=8).batch(0, 3)
    assert x.shape == (3, 8) and torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="outside the vocabulary of 500"):
        TokenFile(path, vocab=500, seq_len=8, seed=1).batch(0, 64)
    with pytest.raises(ValueError, match="is not a file"):
        TokenFile(tmp_path / "missing.bin", vocab=10, seq_len=8)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenFile(path, vocab=1000, seq_len=5000)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        TokenFile(path, vocab=1000, seq_len=8, dtype="int8")
