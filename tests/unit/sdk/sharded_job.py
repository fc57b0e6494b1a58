"""A job with FSDP2-sharded state (gloo, CPU) for tests/unit/sdk/test_sharded.py:
`python sharded_job.py CKPT_DIR OUT.pt [train]`, under torchrun or alone. With `train`
it takes two optimizer steps, checkpointing after each; otherwise it only loads. Rank 0
then writes the full (gathered) model and optimizer state it holds to OUT.pt."""

import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

from mlpe import sdk

run = sdk.start(device="cpu", checkpoint_dir=sys.argv[1])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.GELU(), torch.nn.Linear(6, 4))
if run.world_size > 1:
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
state = {"model": model, "optimizer": optimizer, "note": "first"}
step = run.load(state)
if "train" in sys.argv[3:]:
    for step in (1, 2):
        g = torch.Generator().manual_seed(step * 10 + run.rank)
        model(torch.randn(3, 8, generator=g)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        state["note"] = f"after step {step}"
        run.save(step, state)
    for saver in run.savers.values():
        saver.wait()
full_model, full_optim = get_state_dict(model, optimizer, options=StateDictOptions(
    full_state_dict=True, cpu_offload=True))
if run.rank == 0:
    torch.save({"step": step, "note": state["note"], "model": full_model,
                "optimizer": full_optim}, sys.argv[2])
sys.exit(run.finish())
