"""A Hugging Face Llama trained by a plain script on mlpe.sdk: built from a local config
with random weights (nothing downloaded), patched with mlpe.kernels in one call (RMSNorm,
SwiGLU, rotary embeddings, and the LM head + loss fused so the logits never exist),
sharded with FSDP2 (`fully_shard` per decoder layer, then the whole model), and
checkpointed through the SDK's sharded path (torch.distributed.checkpoint with mlpe's
checksummed manifest). It runs unchanged three ways:

    python examples/train_hf_llama.py --steps 60
    torchrun --nproc-per-node 2 examples/train_hf_llama.py --steps 60
    mlpe jobs submit --script examples/train_hf_llama.py --world-size 2 --device cpu \\
        -- --steps 60

Any Llama-family config (llama, mistral, qwen2, qwen3) works with --config; the data is
the generated counting stream of train_lm.py, so the loss falls.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM

from mlpe import sdk
from mlpe.kernels.hf import apply_mlpe_kernels

CONFIG = Path(__file__).parent / "configs" / "tiny-llama.json"


def batch(step: int, rank: int, size: int, seq: int, vocab: int):
    """Sequences that count up by a per-sequence stride (mod vocab), with noise."""
    g = torch.Generator().manual_seed(step * 7919 + rank)
    start = torch.randint(0, vocab, (size, 1), generator=g)
    stride = torch.randint(1, 4, (size, 1), generator=g)
    seqs = (start + stride * torch.arange(seq + 1)) % vocab
    noise = torch.rand(seqs.shape, generator=g) < 0.05
    seqs = torch.where(noise, torch.randint(0, vocab, seqs.shape, generator=g), seqs)
    return seqs[:, :-1], seqs[:, 1:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="a Llama-family config.json")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--no-fsdp", action="store_true", help="one replica per rank instead")
    args = p.parse_args()

    run = sdk.start(every_steps=args.ckpt_every)
    options = json.loads(args.config.read_text())
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(run.device)
    replaced = apply_mlpe_kernels(model)
    if run.rank == 0:
        print("mlpe.kernels:", "; ".join(replaced), flush=True)
    if not args.no_fsdp:
        if not dist.is_initialized():  # one process: FSDP2 still wants a process group
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = {"model": model, "optimizer": optimizer}
    step = run.load(state)  # sharded: each rank reads its own shards

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
                                                  config.vocab_size))
        # Targets are already the next tokens: shift_labels, so HF does not shift again.
        loss = model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # FSDP2 reduce-scatters the gradients (averaged over ranks)
        if args.no_fsdp and run.world_size > 1:
            for param in model.parameters():
                dist.all_reduce(param.grad)
                param.grad /= run.world_size
        optimizer.step()
        run.report(step, loss=loss.item(), tokens=args.batch * args.seq)
        if run.rank == 0 and (step % 20 == 0 or step == args.steps):
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    if step == args.steps:
        run.save(step, state)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
