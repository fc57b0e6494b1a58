"""A small language model trained by a plain script on mlpe.sdk and mlpe.kernels: a
decoder (RMSNorm, causal attention, SwiGLU MLP) whose LM head and loss are the fused
linear + cross-entropy (the full logits never exist), on a generated token stream with
structure to learn. Gradients are averaged by hand with one all-reduce, as many
training codes do. It runs unchanged three ways:

    python examples/train_lm.py --steps 100
    torchrun --nproc-per-node 2 examples/train_lm.py --steps 100
    mlpe jobs submit --script examples/train_lm.py --world-size 2 --device cpu \\
        --kernel-report-steps 20 -- --steps 100

Under `mlpe control` with --kernel-report-steps, the timings of the mlpe.kernels ops go
out as KernelSummary events.
"""

import argparse
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mlpe import sdk
from mlpe.kernels.linear_cross_entropy import linear_cross_entropy
from mlpe.kernels.rmsnorm import RMSNorm
from mlpe.kernels.swiglu import SwiGLUMLP


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.mlp = SwiGLUMLP(hidden, 4 * hidden)

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Parameter(torch.randn(seq, hidden) * 0.02)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def loss(self, tokens, targets):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return linear_cross_entropy(x.flatten(0, 1), self.head.weight, targets.flatten())


def batch(step: int, rank: int, size: int, seq: int, vocab: int):
    """Sequences that count up by a per-sequence stride (mod vocab), with noise: a model
    that learns the stride predicts the next token."""
    g = torch.Generator().manual_seed(step * 7919 + rank)
    start = torch.randint(0, vocab, (size, 1), generator=g)
    stride = torch.randint(1, 4, (size, 1), generator=g)
    seqs = (start + stride * torch.arange(seq + 1)) % vocab
    noise = torch.rand(seqs.shape, generator=g) < 0.05
    seqs = torch.where(noise, torch.randint(0, vocab, seqs.shape, generator=g), seqs)
    return seqs[:, :-1], seqs[:, 1:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ckpt-every", type=int, default=20)
    args = p.parse_args()

    run = sdk.start(every_steps=args.ckpt_every)
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.hidden, args.layers, args.heads, args.seq).to(run.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = {"model": model, "optimizer": optimizer}
    step = run.load(state)
    tokens = args.batch * args.seq

    while step < args.steps:
        decision = run.poll()
        if decision.checkpoint or decision.preempt:
            run.save(step, state)
        if decision.stop or decision.preempt:
            break
        if decision.pause:
            continue
        step += 1
        x, y = (t.to(run.device) for t in batch(step, run.rank, args.batch, args.seq,
                                                  args.vocab))
        loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.world_size > 1:
            grads = [p.grad for p in model.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= run.world_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        optimizer.step()
        run.report(step, loss=loss.item(), tokens=tokens)
        if run.rank == 0 and (step % 25 == 0 or step == args.steps):
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    if step == args.steps:
        run.save(step, state)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
