"""The worker's model shapes and presets, without torch (the controller validates specs
with them and must start quickly)."""

from __future__ import annotations

import dataclasses
import math

RECOMPUTE = ("none", "full")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 512
    seq_len: int = 128
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 4
    ffn: int = 0  # 0: about 8/3 of hidden, a multiple of 64 (Llama's choice)
    tied: bool = False
    recompute: str = "none"  # "full": each block's activations recomputed in backward

    def __post_init__(self):
        for name in ("vocab", "seq_len", "layers", "hidden", "heads", "kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.ffn < 0:
            raise ValueError(f"model.ffn must be ≥ 0, got {self.ffn}")
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden {self.hidden} is not divisible by model.heads "
                             f"{self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"model.heads {self.heads} is not divisible by model.kv_heads "
                             f"{self.kv_heads}")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"head size hidden/heads = {self.hidden // self.heads} must be "
                             "even for rotary embeddings")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"model.recompute must be one of {', '.join(RECOMPUTE)}, got "
                             f"{self.recompute!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def ffn_size(self) -> int:
        return self.ffn or 64 * math.ceil(self.hidden * 8 / 3 / 64)


PRESETS = {
    "tiny": GPTConfig(vocab=256, seq_len=32, layers=2, hidden=64, heads=4, kv_heads=2),
    "small": GPTConfig(),
    "gpt-30m": GPTConfig(vocab=32000, seq_len=512, layers=6, hidden=384, heads=6, kv_heads=6),
    "gpt-125m": GPTConfig(vocab=50304, seq_len=1024, layers=12, hidden=768, heads=12,
                          kv_heads=12, ffn=2048, tied=True),
}
