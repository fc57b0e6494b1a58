"""Training data for the worker: a synthetic token stream, or a file of tokens.

Both are addressed by position (batch index), not by iteration state, so a run resumed
from a checkpoint at step k reads exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class SyntheticTokens:
    """Sequences with something to learn: each token follows from the previous one by a
    fixed rule (t -> 5t + 3 mod vocab), except one in ten, which is random."""

    def __init__(self, vocab: int, seq_len: int, seed: int = 0):
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed

    def batch(self, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (size, seq_len) int64, for batch number `index`."""
        rng = np.random.default_rng([self.seed, index])
        tokens = np.empty((size, self.seq_len + 1), dtype=np.int64)
        tokens[:, 0] = rng.integers(0, self.vocab, size)
        noise = rng.random((size, self.seq_len)) < 0.1
        random_tokens = rng.integers(0, self.vocab, (size, self.seq_len))
        for i in range(self.seq_len):
            follow = (5 * tokens[:, i] + 3) % self.vocab
            tokens[:, i + 1] = np.where(noise[:, i], random_tokens[:, i], follow)
        t = torch.from_numpy(tokens)
        return t[:, :-1], t[:, 1:]


class TokenFile:
    """A flat file of little-endian uint16 or uint32 tokens (nanoGPT's .bin format when
    uint16); batch `index` takes `size` windows at positions drawn from (seed, index)."""

    def __init__(self, path: str | Path, vocab: int, seq_len: int, seed: int = 0,
                 dtype: str = "uint16"):
        if dtype not in ("uint16", "uint32"):
            raise ValueError(f"data.dtype must be uint16 or uint32, got {dtype!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"data.path {str(self.path)!r} is not a file")
        self.tokens = np.memmap(self.path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"data.path {str(self.path)!r} holds {len(self.tokens)} tokens, "
                             f"fewer than seq_len + 1 = {seq_len + 1}")
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed

    def batch(self, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size)
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        if rows.max(initial=0) >= self.vocab:
            raise ValueError(f"data.path {str(self.path)!r}: token {int(rows.max())} at batch "
                             f"{index} is outside the vocabulary of {self.vocab}")
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]
