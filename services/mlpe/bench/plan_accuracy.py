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
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
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


def _storage(t) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


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
        params = {_storage(p)[0]: _storage(p)[1] for p in model.parameters()}
        buffers = {_storage(b)[0]: _storage(b)[1] for b in model.buffers()}
        saved: dict[int, int] = {}
        counts = {"saved": 0, "param_refs": 0, "buffer_refs": 0}

        def pack(t, saved=saved, counts=counts, params=params, buffers=buffers):
            ptr, nbytes = _storage(t)
            if ptr in params:
                counts["param_refs"] += 1
            elif ptr in buffers:
                counts["buffer_refs"] += 1
            else:
                counts["saved"] += 1
                saved[ptr] = max(saved.get(ptr, 0), nbytes)
            return t

        tokens = torch.randint(0, cfg.vocab, (batch, seq))
        targets = torch.randint(0, cfg.vocab, (batch, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, targets)
        result = {"activations": sum(saved.values()), "parameters": sum(params.values()),
                  "buffers": sum(buffers.values()), **counts,
                  "backend": "fused" if dispatch.interpreting() else "reference"}
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
                             "error_pct": 100.0 * abs(p - m) / m if m else float(p != 0)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'config':58} {'component':12} {'predicted':>12} {'measured':>12} {'error':>7}"]
    for r in rows:
        lines.append(f"{r['config']:58} {r['component']:12} {r['predicted']:>12,} "
                     f"{r['measured']:>12,} {r['error_pct']:>6.2f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
    else:
        print(format_table(accuracy_table()))
