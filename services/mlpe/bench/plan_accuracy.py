"""Measured against predicted: the memory model of the worker's GPT checked on the real
thing.

One training forward of mlpe.worker.model.GPT runs under
torch.autograd.graph.saved_tensors_hooks; every tensor autograd saves for backward is
recorded by the storage it lives in (deduplicated by the storage's data pointer: a view
keeps its whole storage alive, and the same storage saved twice costs once), parameters
and buffers apart. Saved tensors stay referenced by the graph until the loss is dropped,
so no two live storages can share a pointer. Then backward and one FusedAdamW step give
the real gradients and optimizer state. The fused path is measured in a subprocess with
MLPE_KERNELS=triton TRITON_INTERPRET=1, which makes the Triton autograd Functions run on
CPU tensors (mlpe.kernels.dispatch), so their save_for_backward is what is counted; the
reference path runs on the plain-PyTorch references (CPU). The model is fp32 on the CPU.

Predictions come from mlpe.optimizer.memory.worker_activation_bytes and
worker_state_bytes; accuracy_table() puts the two side by side.

Two more tables check the planner's generic models, which know a model only as a
ModelShape:
- hf_activation_table(): Hugging Face llama / mistral / qwen2 / qwen3 models (random
  init, fp32, attn_implementation="eager", no mlpe.kernels), bytes saved by one training
  forward (counted as above) against plan_memory(..., kernels="eager").activations for
  mlpe.optimizer.models.from_hf_config(config); the rows also carry Korthikanti's fused
  count ("baseline"), which under-predicts them.
- fsdp_table(): FSDP2 (fully_shard per transformer block, then the root) over 2 gloo
  ranks on the CPU, in 2 spawned processes: each rank's local shards of the parameters,
  of the gradients after one backward and of FusedAdamW's exp_avg and exp_avg_sq after
  one step (storages counted once: FSDP2's gradients are views of one reduce-scatter
  output per unit), the largest rank against the planner's ZeRO-3 per-GPU figures
  (plan_memory(..., "fp32", "adamw", dp=2, zero_stage=3)). FSDP2 pads each parameter's
  dim-0 shard to ceil(rows / world) rows (parameters and gradients; the optimizer state
  is allocated like the unpadded local shard); the rows report that padding apart
  ("padding"): with 2 ranks it is at most one row per parameter of odd dim 0, which the
  planner leaves out.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from mlpe.common.settings import environment
from mlpe.optimizer.memory import worker_activation_bytes, worker_state_bytes

# (GPTConfig fields, batch, seq): small enough for Triton's interpreter.
CONFIGS: list[tuple[dict, int, int]] = [
    ({"vocab": 256, "seq_len": 32, "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2},
     2, 32),
    ({"vocab": 256, "seq_len": 32, "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2,
      "recompute": "full"}, 2, 32),
    ({"vocab": 384, "seq_len": 64, "layers": 3, "hidden": 96, "heads": 6, "kv_heads": 3,
      "ffn": 160, "tied": True}, 1, 48),
    ({"vocab": 384, "seq_len": 64, "layers": 3, "hidden": 96, "heads": 6, "kv_heads": 3,
      "ffn": 160, "tied": True, "recompute": "full"}, 3, 16),
]
COMPONENTS = ("activations", "parameters", "gradients", "optimizer")
STATE_COMPONENTS = COMPONENTS[1:]

# Hugging Face Llama-family models: (model_type, config fields, batch, seq). Small
# enough to measure in seconds; between them they vary hidden, layers, heads and kv_heads
# (GQA, MHA, and MQA with one sequence and with three), intermediate size, sequence,
# batch, tying and the model type's extras (Qwen2's q/k/v biases, Qwen3's q/k norms).
HF_CONFIGS: list[tuple[str, dict, int, int]] = [
    ("llama", {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 160},
     2, 32),
    ("mistral", {"vocab_size": 320, "hidden_size": 96, "num_hidden_layers": 3,
                 "num_attention_heads": 6, "num_key_value_heads": 1,
                 "intermediate_size": 256}, 1, 48),
    ("qwen2", {"vocab_size": 384, "hidden_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 352,
               "tie_word_embeddings": True}, 2, 24),
    ("qwen3", {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
               "intermediate_size": 192}, 3, 16),
    ("llama", {"vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 344,
               "tie_word_embeddings": True}, 1, 64),
]

# FSDP2 jobs: {"kind": "gpt", "cfg": GPTConfig fields} or {"kind": "hf", "model_type",
# "config": fields}, with "batch" and "seq". The worker's tiny and small presets, an odd,
# tied vocabulary (FSDP2's padding) and a Llama.
FSDP_WORLD = 2
FSDP_JOBS: list[dict] = [
    {"kind": "gpt", "preset": "tiny", "batch": 2, "seq": 16},
    {"kind": "gpt", "preset": "small", "batch": 2, "seq": 16},
    {"kind": "gpt", "cfg": {"vocab": 509, "seq_len": 32, "layers": 3, "hidden": 96,
                            "heads": 6, "kv_heads": 3, "tied": True}, "batch": 1, "seq": 16},
    {"kind": "hf", "model_type": "llama",
     "config": {"vocab_size": 1000, "hidden_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 352}, "batch": 2, "seq": 16},
]


def _storage(t) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def _error_pct(predicted: float, measured: float) -> float:
    return 100.0 * abs(predicted - measured) / measured if measured else float(predicted != 0)


def _count_saved(model, forward) -> tuple[Any, dict]:
    """Run forward() under saved-tensor hooks: (its result, {"activations": bytes of the
    unique storages saved for backward, parameters and buffers apart, "parameters",
    "buffers", "saved", "param_refs", "buffer_refs"})."""
    import torch

    params = {_storage(p)[0]: _storage(p)[1] for p in model.parameters()}
    buffers = {_storage(b)[0]: _storage(b)[1] for b in model.buffers()}
    saved: dict[int, int] = {}
    counts = {"saved": 0, "param_refs": 0, "buffer_refs": 0}

    def pack(t):
        ptr, nbytes = _storage(t)
        if ptr in params:
            counts["param_refs"] += 1
        elif ptr in buffers:
            counts["buffer_refs"] += 1
        else:
            counts["saved"] += 1
            saved[ptr] = max(saved.get(ptr, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, {"activations": sum(saved.values()), "parameters": sum(params.values()),
                 "buffers": sum(buffers.values()), **counts}


def _measure_here(jobs: list[dict]) -> list[dict]:
    """Run the measurements in this process, on whichever kernel path it dispatches to."""
    import torch

    from mlpe.kernels import dispatch
    from mlpe.kernels.adamw import FusedAdamW
    from mlpe.worker.model import GPT, GPTConfig

    results = []
    for job in jobs:
        cfg = GPTConfig(**job["cfg"])
        batch, seq = job["batch"], job["seq"]
        torch.manual_seed(0)
        model = GPT(cfg)
        model.train()
        tokens = torch.randint(0, cfg.vocab, (batch, seq))
        targets = torch.randint(0, cfg.vocab, (batch, seq))
        loss, result = _count_saved(model, lambda m=model, x=tokens, y=targets: m(x, y))
        result["backend"] = "fused" if dispatch.interpreting() else "reference"
        if job.get("states", True):
            loss.backward()
            del loss
            grads = {_storage(p.grad)[0]: _storage(p.grad)[1] for p in model.parameters()
                     if p.grad is not None}
            optimizer = FusedAdamW(model.parameters(), lr=1e-3)
            optimizer.step()
            state = {_storage(t)[0]: _storage(t)[1] for s in optimizer.state.values()
                     for t in s.values() if isinstance(t, torch.Tensor)}
            result.update(gradients=sum(grads.values()), optimizer=sum(state.values()))
        results.append(result)
    return results


def _measure_in_subprocess(jobs: list[dict], fused: bool) -> list[dict]:
    # TRITON_INTERPRET="" is off for Triton, as unset is.
    env = (environment(MLPE_KERNELS="triton", TRITON_INTERPRET="1") if fused else
           environment(MLPE_KERNELS="reference", TRITON_INTERPRET=""))
    proc = subprocess.run([sys.executable, "-m", "mlpe.bench.plan_accuracy", json.dumps(jobs)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode:
        raise RuntimeError(f"measuring in a subprocess failed ({proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    want = "fused" if fused else "reference"
    for r in results:
        if r["backend"] != want:
            raise RuntimeError(f"measured the {r['backend']} path, wanted {want}: is Triton "
                               "installed?")
    return results


def measure(jobs: list[dict], fused: bool) -> list[dict]:
    """Measure [{"cfg": GPTConfig fields, "batch": b, "seq": s, "states": bool}, ...];
    per job {"activations", "parameters", "buffers", "gradients", "optimizer"} in bytes.
    fused=True always runs in a Triton-interpreter subprocess; fused=False runs here unless
    this process itself is interpreting the Triton kernels."""
    if fused:
        return _measure_in_subprocess(jobs, fused=True)
    from mlpe.kernels import dispatch

    if dispatch.backend() != "reference" and dispatch.interpreting():
        return _measure_in_subprocess(jobs, fused=False)
    return _measure_here(jobs)


def measure_saved_bytes(cfg: Any, batch: int, fused: bool, seq: int | None = None) -> int:
    """Bytes one forward of GPT(cfg) saves for backward (unique storages, parameters and
    buffers excluded)."""
    job = {"cfg": _fields(cfg), "batch": batch, "seq": seq or cfg.seq_len, "states": False}
    return measure([job], fused)[0]["activations"]


def _fields(cfg: Any) -> dict:
    return cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)


def describe(cfg: dict, batch: int, seq: int, fused: bool) -> str:
    c = {"tied": False, "recompute": "none", "ffn": 0, **cfg}
    return (f"L{c['layers']} h{c['hidden']} a{c['heads']}/{c['kv_heads']} V{c['vocab']}"
            f"{' tied' if c['tied'] else ''} b{batch} s{seq} recompute={c['recompute']} "
            f"{'fused' if fused else 'reference'}")


def accuracy_table(configs: list[tuple[dict, int, int]] | None = None,
                   paths: tuple[bool, ...] = (True, False)) -> list[dict]:
    """Rows {config, component, predicted, measured, error_pct} for every configuration
    (GPTConfig fields, batch, seq) and kernel path (True: fused, False: reference), for the
    activations saved by one forward and for parameters, gradients and FusedAdamW state."""
    from mlpe.common.jobs import GPTConfig

    configs = CONFIGS if configs is None else configs
    jobs = [{"cfg": cfg, "batch": b, "seq": s, "states": True} for cfg, b, s in configs]
    rows = []
    for fused in paths:
        for (cfg_fields, batch, seq), got in zip(configs, measure(jobs, fused), strict=True):
            cfg = GPTConfig(**cfg_fields)
            states = worker_state_bytes(cfg, 4)
            predicted = {"activations": worker_activation_bytes(cfg, batch, seq, 4,
                                                                cfg.recompute, fused),
                         "parameters": states["params"], "gradients": states["grads"],
                         "optimizer": states["optimizer"]}
            for component in COMPONENTS:
                p, m = predicted[component], got[component]
                rows.append({"config": describe(cfg_fields, batch, seq, fused),
                             "component": component, "predicted": p, "measured": m,
                             "error_pct": _error_pct(p, m)})
    return rows


# -- Hugging Face activations ---------------------------------------------------------------
def hf_config(model_type: str, fields: dict, seq: int):
    """A transformers config for random init: fp32, eager attention, no KV cache."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{"max_position_embeddings": seq,
                                               "attn_implementation": "eager",
                                               "use_cache": False, **fields})


def _hf_model(model_type: str, fields: dict, seq: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(model_type, fields, seq),
                                             dtype=torch.float32)
    model.train()
    return model


def measure_hf(jobs: list[tuple[str, dict, int, int]]) -> list[dict]:
    """Bytes one training forward of each Hugging Face (model_type, config fields,
    batch, seq) saves for backward (counted as the GPT's), with the loss taken as the
    worker takes it (labels = shift_labels = the next tokens)."""
    import torch

    results = []
    for model_type, fields, batch, seq in jobs:
        model = _hf_model(model_type, fields, seq)
        tokens = torch.randint(0, model.config.vocab_size, (batch, seq))
        targets = torch.randint(0, model.config.vocab_size, (batch, seq))
        _, result = _count_saved(model, lambda m=model, x=tokens, y=targets: m(
            input_ids=x, labels=y, shift_labels=y, use_cache=False).loss)
        results.append(result)
    return results


def hf_predicted(model_type: str, fields: dict, batch: int, seq: int,
                 kernels: str = "eager") -> int:
    """The planner's generic activation model for that configuration: one micro-batch,
    fp32, no parallelism, eager attention (flash=False)."""
    from mlpe.optimizer.memory import plan_memory
    from mlpe.optimizer.models import from_hf_config

    shape = from_hf_config(hf_config(model_type, fields, seq))
    return round(plan_memory(shape, seq, "fp32", "adamw", flash=False, kernels=kernels,
                             micro_batch=batch).activations)


def describe_hf(model_type: str, fields: dict, batch: int, seq: int) -> str:
    f = fields
    heads = f["num_attention_heads"]
    return (f"{model_type} L{f['num_hidden_layers']} h{f['hidden_size']} "
            f"a{heads}/{f.get('num_key_value_heads') or heads}"
            f" f{f['intermediate_size']} V{f['vocab_size']}"
            f"{' tied' if f.get('tie_word_embeddings') else ''} b{batch} s{seq} eager")


def hf_activation_table(configs: list[tuple[str, dict, int, int]] | None = None) -> list[dict]:
    """Rows {config, component: "activations", predicted (kernels="eager"), measured,
    error_pct, baseline (Korthikanti's fused count), baseline_error_pct}."""
    configs = HF_CONFIGS if configs is None else configs
    rows = []
    for job, got in zip(configs, measure_hf(configs), strict=True):
        p, m = hf_predicted(*job), got["activations"]
        base = hf_predicted(*job, kernels="fused")
        rows.append({"config": describe_hf(*job), "component": "activations",
                     "predicted": p, "measured": m, "error_pct": _error_pct(p, m),
                     "baseline": base, "baseline_error_pct": _error_pct(base, m)})
    return rows


# -- FSDP2 model states -----------------------------------------------------------------------
def _fsdp_model(job: dict):
    """(model, its transformer blocks, vocab, loss function) for an FSDP_JOBS entry."""
    if job["kind"] == "gpt":
        import torch

        from mlpe.common.jobs import PRESETS
        from mlpe.worker.model import GPT, GPTConfig

        cfg = PRESETS[job["preset"]] if job.get("preset") else GPTConfig(**job["cfg"])
        torch.manual_seed(0)
        model = GPT(cfg)
        return model, model.blocks, cfg.vocab, lambda x, y: model(x, y)
    model = _hf_model(job["model_type"], job["config"], job["seq"])
    return (model, model.model.layers, model.config.vocab_size,
            lambda x, y: model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss)


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _shard_bytes(tensors) -> tuple[int, int]:
    """(bytes of the unique storages behind these tensors' local shards, bytes of the
    local shards themselves)."""
    storages: dict[int, int] = {}
    local = 0
    for t in tensors:
        t = _local(t)
        ptr, nbytes = _storage(t)
        storages[ptr] = max(storages.get(ptr, 0), nbytes)
        local += t.numel() * t.element_size()
    return sum(storages.values()), local


def _fsdp_rank(rank: int, world: int, init: str, jobs: list[dict], out_dir: str) -> None:
    """One rank of the FSDP2 measurement (torch.multiprocessing.spawn's target)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from mlpe.kernels.adamw import FusedAdamW

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = []
        for job in jobs:
            model, blocks, vocab, loss_of = _fsdp_model(job)
            model.train()
            psi = sum(p.numel() for p in model.parameters())
            for block in blocks:
                fully_shard(block)
            fully_shard(model)
            params = _shard_bytes(model.parameters())
            torch.manual_seed(1)
            tokens = torch.randint(0, vocab, (job["batch"], job["seq"]))
            targets = torch.randint(0, vocab, (job["batch"], job["seq"]))
            loss_of(tokens, targets).backward()
            grads = _shard_bytes(p.grad for p in model.parameters() if p.grad is not None)
            optimizer = FusedAdamW(model.parameters(), lr=1e-3)
            optimizer.step()
            states = _shard_bytes(s[k] for s in optimizer.state.values()
                                  for k in ("exp_avg", "exp_avg_sq"))
            results.append({"psi": psi, **{name: {"storage": got[0], "local": got[1]}
                                           for name, got in zip(STATE_COMPONENTS,
                                                                (params, grads, states),
                                                                strict=True)}})
            del model, optimizer
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _measure_fsdp_here(jobs: list[dict], world: int) -> list[list[dict]]:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="mlpe-fsdp-") as tmp:
        init = f"file://{tmp}/rendezvous"
        mp.spawn(_fsdp_rank, args=(world, init, jobs, tmp), nprocs=world, join=True)
        per_rank = [json.loads((Path(tmp) / f"rank{r}.json").read_text())
                    for r in range(world)]
    return [list(ranks) for ranks in zip(*per_rank, strict=True)]


def measure_fsdp(jobs: list[dict], world: int = FSDP_WORLD) -> list[list[dict]]:
    """Per job, per rank: {"psi", "parameters", "gradients", "optimizer"}, the last three
    {"storage": bytes, "local": bytes}. Runs in a subprocess (the reference kernels, no
    Triton interpreter) that spawns the world's ranks."""
    env = environment(MLPE_KERNELS="reference", TRITON_INTERPRET="")
    proc = subprocess.run([sys.executable, "-m", "mlpe.bench.plan_accuracy", "--fsdp",
                           json.dumps({"jobs": jobs, "world": world})], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode:
        raise RuntimeError(f"measuring FSDP2 in a subprocess failed ({proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fsdp_shape(job: dict):
    """The ModelShape the planner sees for an FSDP_JOBS entry."""
    from mlpe.common.jobs import PRESETS, GPTConfig
    from mlpe.optimizer.models import from_hf_config, worker_model

    if job["kind"] == "gpt":
        return worker_model(PRESETS[job["preset"]] if job.get("preset")
                            else GPTConfig(**job["cfg"]))
    return from_hf_config(hf_config(job["model_type"], job["config"], job["seq"]))


def describe_fsdp(job: dict, world: int) -> str:
    m = fsdp_shape(job)
    name = (f"gpt {job['preset']}" if job.get("preset") else "gpt" if job["kind"] == "gpt"
            else job["model_type"])
    return (f"fsdp2 x{world} {name} L{m.layers} h{m.hidden} a{m.heads}/{m.kv_heads} "
            f"V{m.vocab}{' tied' if m.tied else ''} ({m.params() / 1e6:.2f}M)")


def fsdp_table(jobs: list[dict] | None = None, world: int = FSDP_WORLD) -> list[dict]:
    """Rows {config, component (parameters, gradients, optimizer), predicted (the
    planner's ZeRO-3 per-GPU bytes), measured (the largest rank's local storages),
    error_pct, padding (the most FSDP2's dim-0 padding adds to a rank's storages), ranks
    (each rank's storage bytes)}."""
    from mlpe.optimizer.memory import plan_memory

    jobs = FSDP_JOBS if jobs is None else jobs
    rows = []
    for job, ranks in zip(jobs, measure_fsdp(jobs, world), strict=True):
        shape = fsdp_shape(job)
        if shape.params() != ranks[0]["psi"]:
            raise RuntimeError(f"{describe_fsdp(job, world)}: the planner counts "
                               f"{shape.params():,} parameters, the model has "
                               f"{ranks[0]['psi']:,}")
        mem = plan_memory(shape, job["seq"], "fp32", "adamw", dp=world, zero_stage=3,
                          micro_batch=job["batch"])
        predicted = {"parameters": mem.params, "gradients": mem.grads,
                     "optimizer": mem.optimizer}
        for component in STATE_COMPONENTS:
            p = round(predicted[component])
            m = max(r[component]["storage"] for r in ranks)
            rows.append({"config": describe_fsdp(job, world), "component": component,
                         "predicted": p, "measured": m, "error_pct": _error_pct(p, m),
                         "padding": max(r[component]["storage"] - r[component]["local"]
                                        for r in ranks),
                         "ranks": [r[component]["storage"] for r in ranks]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'config':58} {'component':12} {'predicted':>12} {'measured':>12} {'error':>7}"]
    for r in rows:
        lines.append(f"{r['config']:58} {r['component']:12} {r['predicted']:>12,} "
                     f"{r['measured']:>12,} {r['error_pct']:>6.2f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--fsdp":
        request = json.loads(sys.argv[2])
        print(json.dumps(_measure_fsdp_here(request["jobs"], request["world"])))
    elif len(sys.argv) > 1:
        print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
    else:
        print(format_table(accuracy_table() + hf_activation_table() + fsdp_table()))
