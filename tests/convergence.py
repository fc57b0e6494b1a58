"""The training loop the convergence tests share (tests/gpu on a GPU, the interpreted one on
the CPU): the worker's GPT on synthetic tokens, fused or reference AdamW."""

from __future__ import annotations

import torch

from mlpe.common.jobs import GPTConfig
from mlpe.kernels.adamw import FusedAdamW
from mlpe.worker.data import SyntheticTokens
from mlpe.worker.model import GPT


def train_losses(cfg: GPTConfig, steps: int, batch: int, device: str, dtype=torch.float32,
                 fused_optimizer: bool = True) -> list[float]:
    torch.manual_seed(0)
    model = GPT(cfg).to(device=device, dtype=dtype)
    data = SyntheticTokens(cfg.vocab, cfg.seq_len, seed=1)
    make = FusedAdamW if fused_optimizer else torch.optim.AdamW
    opt = make(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses = []
    for step in range(steps):
        x, y = (t.to(device) for t in data.batch(step, batch))
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
