"""A plain PyTorch training script on mlpe.sdk: an MLP classifier (DistributedDataParallel)
on generated data — not a language model. It runs unchanged three ways:

    python examples/train_mlp.py --steps 200
    torchrun --nproc-per-node 2 examples/train_mlp.py --steps 200
    mlpe jobs submit --script examples/train_mlp.py --world-size 2 --device cpu -- --steps 200

Under `mlpe control` it can be paused, resumed, checkpointed on request, preempted and
restarted after a crash from its newest good checkpoint; on the CPU the resumed run is
bitwise the one that never stopped (batches are addressed by step and rank, and the
RNG state is checkpointed with the weights).
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mlpe import sdk


def batch(step: int, rank: int, size: int, features: int, classes: int, seed: int):
    """Batch `step` of `rank`: points around one centre per class (the same every run)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    centres = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, features, generator=centres) * 0.6  # overlapping classes
    y = torch.randint(0, classes, (size,), generator=g)
    x = means[y] + torch.randn(size, features, generator=g)
    return x, y


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64, help="examples per rank per step")
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="where to train (default: the job spec's device)")
    p.add_argument("--ckpt-every", type=int, default=20,
                   help="checkpoint every N steps (unless the job spec sets a policy)")
    args = p.parse_args()

    run = sdk.start(device=args.device, every_steps=args.ckpt_every)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(args.features, args.hidden), nn.GELU(),
                          nn.Linear(args.hidden, args.hidden), nn.GELU(),
                          nn.Linear(args.hidden, args.classes)).to(run.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    state = {"model": model, "optimizer": optimizer, "rng": torch.get_rng_state()}
    step = run.load(state)
    torch.set_rng_state(state["rng"])
    ddp = DistributedDataParallel(model) if run.world_size > 1 else model

    while step < args.steps:
        decision = run.poll()
        if decision.checkpoint or decision.preempt:
            state["rng"] = torch.get_rng_state()
            run.save(step, state)
        if decision.stop or decision.preempt:
            break
        if decision.pause:
            continue
        step += 1
        x, y = (t.to(run.device) for t in batch(step, run.rank, args.batch, args.features,
                                                  args.classes, args.seed))
        logits = ddp(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = (logits.argmax(-1) == y).float().mean().item()
        run.report(step, loss=loss.item(), tokens=args.batch, accuracy=accuracy)
        if run.rank == 0 and (step % 50 == 0 or step == args.steps):
            print(f"step {step}: loss {loss.item():.4f}, accuracy {accuracy:.2f}", flush=True)
    if step == args.steps:
        state["rng"] = torch.get_rng_state()
        run.save(step, state)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
