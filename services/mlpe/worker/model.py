"""The worker's GPT: a Llama-style decoder (RMSNorm, RoPE, grouped-query attention,
SwiGLU MLP) built on mlpe.kernels, so it runs the fused Triton ops on CUDA and their
PyTorch references on the CPU, and a loss head that never holds all the logits.

Residual adds are fused into the norms: each norm takes the previous sub-layer's output
and the residual stream and returns (normalised, new residual stream).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlpe.common.jobs import PRESETS, RECOMPUTE, GPTConfig  # noqa: F401 - re-exported
from mlpe.kernels.linear_cross_entropy import linear_cross_entropy
from mlpe.kernels.rmsnorm import RMSNorm
from mlpe.kernels.rope import RotaryEmbedding
from mlpe.kernels.swiglu import SwiGLUMLP


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim,
                             bias=False)
        self.out = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, -1, self.head_dim).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=2)
        q, k = self.rotary(q, k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.out(y.transpose(1, 2).reshape(batch, seq, -1))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.hidden), RMSNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.mlp = SwiGLUMLP(cfg.hidden, cfg.ffn_size)

    def forward(self, delta: torch.Tensor, residual: torch.Tensor | None):
        """(previous sub-layer's output, residual stream or None for the first block) ->
        (this block's MLP output, residual stream before it)."""
        if residual is None:
            x, residual = self.attn_norm(delta), delta
        else:
            x, residual = self.attn_norm(delta, residual)
        x, residual = self.mlp_norm(self.attn(x).to(residual.dtype), residual)
        return self.mlp(x).to(residual.dtype), residual


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tied:
            self.head.weight = self.embed.weight
        # GPT-2's initialisation: N(0, 0.02), the projections into the residual stream
        # scaled down by depth so the stream's variance does not grow with it.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            for weight in (block.attn.out.weight, block.mlp.down_proj.weight):
                nn.init.normal_(weight, std=0.02 / math.sqrt(2 * cfg.layers))

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(f"tokens {tuple(tokens.shape)} must be (batch, seq) with seq ≤ "
                             f"{self.cfg.seq_len}")
        delta, residual = self.embed(tokens), None
        for block in self.blocks:
            if self.cfg.recompute == "full" and self.training and torch.is_grad_enabled():
                delta, residual = checkpoint(block, delta, residual, use_reentrant=False)
            else:
                delta, residual = block(delta, residual)
        return self.norm(delta, residual)[0]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (batch, seq, vocab) without targets; with targets (batch, seq) the mean
        cross-entropy, through the fused head that never holds all the logits."""
        x = self.hidden_states(tokens)
        if targets is None:
            return self.head(x)
        if torch.is_autocast_enabled(x.device.type):  # the fused head takes one dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return linear_cross_entropy(x.reshape(-1, x.shape[-1]),
                                    self.head.weight.to(x.dtype), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
