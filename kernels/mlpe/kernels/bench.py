"""Kernel benchmarks: each op against PyTorch eager (its reference) and torch.compile.

Ops: rmsnorm, rmsnorm+residual, layernorm (hidden = model width), swiglu (hidden = MLP
width), rope (hidden = query width: hidden/128 query heads of 128, a quarter as many
key heads), cross_entropy and linear_cross_entropy (over --vocab sizes instead, the
latter with an LM head of --lm-hidden; ce_mem_vs_eager and linear_ce_mem_vs_eager compare
peak memory at the vocabulary nearest 128k), adamw (one optimizer step over 8 square
parameters of side hidden, against torch.optim.AdamW's foreach and fused implementations
and a compiled step).

    python -m mlpe.kernels.bench [--csv FILE] [--hidden 1024,...] [--tokens 8192]

Times are medians of triton.testing.do_bench (CUDA events, at least 50 runs); GB/s
counts the bytes an op must move at least (inputs read once, outputs written once),
and its fraction is of the device-to-device copy bandwidth measured first. Prints a
table, then one JSON line. Without a GPU it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

OPS = ("rmsnorm", "rmsnorm+residual", "layernorm", "swiglu", "rope", "cross_entropy",
       "linear_cross_entropy", "adamw")
VOCAB_OPS = ("cross_entropy", "linear_cross_entropy")
COMPUTE_BOUND = ("linear_cross_entropy",)  # matmuls: GB/s says nothing; time and memory do


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (bytes read + written) of a 1 GiB tensor."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def _liger():
    """Liger-Kernel's functional ops when it is installed (compared where it has the op
    with our layout: not RoPE, whose q/k layout differs, nor AdamW), else None."""
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    return functional


def _case(op: str, tokens: int, hidden: int, dtype, device: str = "cuda",
          lm_hidden: int = 4096):
    """(tensors that get gradients, {impl: call returning the output}, bytes forward,
    bytes backward): the least traffic each direction must move. For adamw there are no
    gradients to take (None) and the call is one optimizer step."""
    import torch

    from mlpe.kernels.rmsnorm import rmsnorm, rmsnorm_reference
    from mlpe.kernels.swiglu import swiglu, swiglu_reference

    torch._dynamo.reset()  # each case compiles afresh (no recompile limit, no stale graphs)
    if op == "adamw":
        from mlpe.kernels.adamw import FusedAdamW

        def optimizer(make, **kw):
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(hidden, hidden, device=device,
                                                     dtype=dtype)) for _ in range(8)]
            for p in params:
                p.grad = torch.randn_like(p)
            return make(params, lr=1e-4, weight_decay=0.1, **kw)

        ours, foreach = optimizer(FusedAdamW), optimizer(torch.optim.AdamW, foreach=True)
        fused = optimizer(torch.optim.AdamW, fused=True) if device == "cuda" else foreach
        compiled_opt = optimizer(torch.optim.AdamW, foreach=True)
        compiled = torch.compile(compiled_opt.step, dynamic=False)
        impls = {"mlpe": ours.step, "eager": foreach.step, "torch_fused": fused.step,
                 "compile": compiled}
        n, size = 8 * hidden * hidden, torch.empty(0, dtype=dtype).element_size()
        # Reads p, g, m, v; writes p, m, v (the moments in fp32).
        return None, impls, n * (3 * size + 16), 0
    if op == "linear_cross_entropy":  # hidden here is the vocabulary size
        from mlpe.kernels.linear_cross_entropy import (
            linear_cross_entropy,
            linear_cross_entropy_reference,
        )

        x = torch.randn(tokens, lm_hidden, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(hidden, lm_hidden, device=device) / lm_hidden**0.5).to(dtype)
        w.requires_grad_()
        targets = torch.randint(0, hidden, (tokens,), device=device)
        compiled = torch.compile(linear_cross_entropy_reference, dynamic=False)
        impls = {"mlpe": lambda: linear_cross_entropy(x, w, targets),
                 "eager": lambda: linear_cross_entropy_reference(x, w, targets),
                 "compile": lambda: compiled(x, w, targets)}
        if liger := _liger():
            impls["liger"] = lambda: liger.liger_fused_linear_cross_entropy(x, w, targets)
        return [x, w], impls, 0, 0
    if op == "cross_entropy":  # hidden here is the vocabulary size
        from mlpe.kernels.cross_entropy import cross_entropy, cross_entropy_reference

        logits = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, hidden, (tokens,), device=device)
        size = logits.numel() * logits.element_size()
        compiled = torch.compile(cross_entropy_reference, dynamic=False)
        impls = {"mlpe": lambda: cross_entropy(logits, targets),
                 "eager": lambda: cross_entropy_reference(logits, targets),
                 "compile": lambda: compiled(logits, targets)}
        if liger := _liger():
            impls["liger"] = lambda: liger.liger_cross_entropy(logits, targets)
        # Forward reads the logits twice and writes the gradient; backward moves nothing.
        return [logits], impls, 3 * size, size
    if op == "rope":
        from mlpe.kernels.rope import rope, rope_cache, rope_reference

        heads = max(hidden // 128, 4)
        q = torch.randn(1, tokens, heads, 128, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, tokens, heads // 4, 128, device=device, dtype=dtype,
                        requires_grad=True)
        cos, sin = rope_cache(tokens, 128, device=device)
        size = (q.numel() + k.numel()) * q.element_size()
        compiled = torch.compile(rope_reference, dynamic=False)
        impls = {"mlpe": lambda: rope(q, k, cos, sin),
                 "eager": lambda: rope_reference(q, k, cos, sin),
                 "compile": lambda: compiled(q, k, cos, sin)}
        return [q, k], impls, 2 * size, 2 * size  # q, k in and out, both directions
    if op == "swiglu":  # hidden here is the MLP's intermediate size
        gate = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        up = torch.randn_like(gate, requires_grad=True)
        size = gate.numel() * gate.element_size()
        compiled = torch.compile(swiglu_reference, dynamic=False)
        impls = {"mlpe": lambda: swiglu(gate, up), "eager": lambda: swiglu_reference(gate, up),
                 "compile": lambda: compiled(gate, up)}
        if liger := _liger():
            impls["liger"] = lambda: liger.liger_swiglu(gate, up)
        # Forward reads gate, up and writes y; backward reads gate, up, dy, writes both.
        return [gate, up], impls, 3 * size, 5 * size
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    if op == "layernorm":
        from mlpe.kernels.layernorm import layernorm, layernorm_reference

        b = torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)
        size = x.numel() * x.element_size()
        compiled = torch.compile(layernorm_reference, dynamic=False)
        impls = {"mlpe": lambda: layernorm(x, w, b), "eager": lambda: layernorm_reference(
            x, w, b), "compile": lambda: compiled(x, w, b)}
        if liger := _liger():
            impls["liger"] = lambda: liger.liger_layer_norm(x, w, b, 1e-5)
        return [x, w, b], impls, 2 * size, 3 * size  # as RMSNorm: x in, y out; dy, x, dx
    r = torch.randn_like(x, requires_grad=True) if op == "rmsnorm+residual" else None
    size = x.numel() * x.element_size()
    compiled = torch.compile(rmsnorm_reference, dynamic=False)
    impls = {"mlpe": lambda: rmsnorm(x, w, 1e-6, r),
             "eager": lambda: rmsnorm_reference(x, w, 1e-6, r),
             "compile": lambda: compiled(x, w, 1e-6, r)}
    if liger := _liger():
        impls["liger"] = ((lambda: liger.liger_rms_norm(x, w, 1e-6)) if r is None else
                          (lambda: liger.liger_fused_add_rms_norm(x, r, w, 1e-6)))
    # Forward reads x (+r), writes y (+h); backward reads dy, h (+dh), writes dx.
    return [t for t in (x, w, r) if t is not None], impls, size * (4 if r is not None else 2), \
        size * (4 if r is not None else 3)


def _measure(call, leaves):
    import torch
    from triton.testing import do_bench

    if leaves is None:  # an optimizer step: nothing to differentiate
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = do_bench(call, warmup=10, rep=100, return_mode="median")
        return ms, ms, torch.cuda.max_memory_allocated() - base

    def outputs():
        out = call()
        return list(out) if isinstance(out, tuple) else [out]

    grads = [torch.randn_like(o) for o in outputs()]  # every output gets a gradient
    fwd = do_bench(call, warmup=10, rep=100, return_mode="median")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    full = do_bench(lambda: torch.autograd.backward(outputs(), grads), warmup=10, rep=100,
                    grad_to_none=leaves, return_mode="median")
    return fwd, full, torch.cuda.max_memory_allocated() - base


def run(hidden_sizes: list[int], tokens: int, dtype, csv_path: str | None,
        ops: list[str] = OPS, vocab_sizes: list[int] = (32768, 65536, 131072, 262144),
        lm_hidden: int = 4096, plot_path: str | None = None) -> dict:
    import torch  # here, not at the top: `mlpe --help` must not pay for importing torch

    if not torch.cuda.is_available():
        print("mlpe bench kernels: no CUDA GPU here; nothing to measure")
        return {"bench": "kernels", "gpu": None, "min_bw_fraction": None,
                "worst_speed_vs_compile": None, "ce_mem_vs_eager": None,
                "linear_ce_mem_vs_eager": None}
    gpu = torch.cuda.get_device_name()
    copy = copy_bandwidth()
    print(f"{gpu}: device-to-device copy {copy:,.0f} GB/s; {tokens} tokens, {dtype}")
    rows = []
    for op in ops:
        for hidden in (vocab_sizes if op in VOCAB_OPS else hidden_sizes):
            leaves, impls, bytes_fwd, bytes_bwd = _case(op, tokens, hidden, dtype,
                                                        lm_hidden=lm_hidden)
            times = {name: _measure(call, leaves) for name, call in impls.items()}
            for name, (fwd, full, peak) in times.items():
                bwd = max(full - fwd, 1e-9) if leaves is not None else 0.0
                row = {"op": op, "impl": name, "hidden": hidden, "tokens": tokens,
                       "dtype": str(dtype).removeprefix("torch."), "fwd_ms": round(fwd, 4),
                       "bwd_ms": round(bwd, 4), "full_ms": round(full, 4),
                       "fwd_gbps": round(bytes_fwd / fwd / 1e6, 1),
                       "bwd_gbps": round(bytes_bwd / bwd / 1e6, 1) if bwd else 0.0,
                       "fwd_bw_fraction": round(bytes_fwd / fwd / 1e6 / copy, 3),
                       "full_vs_compile": round(times["compile"][1] / full, 3),
                       "peak_mib": round(peak / 2**20, 1)}
                rows.append(row)
                print(f"  {op:17s} {name:8s} h={hidden:6d}  fwd {fwd:7.4f} ms "
                      f"{row['fwd_gbps']:7.0f} GB/s ({row['fwd_bw_fraction']:.0%})  bwd "
                      f"{bwd:7.4f} ms {row['bwd_gbps']:7.0f} GB/s  full {full:7.4f} ms  "
                      f"x{row['full_vs_compile']:.2f} vs compile", flush=True)
    if csv_path:
        with open(csv_path, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if plot_path:
        from mlpe.kernels.plot import plot

        plot(rows, plot_path)
    ours = [r for r in rows if r["impl"] == "mlpe"]
    memory_bound = [r for r in ours if r["op"] not in COMPUTE_BOUND]
    big = [r for r in memory_bound if r["hidden"] >= 4096 and r["op"] not in VOCAB_OPS]
    return {"bench": "kernels", "gpu": gpu, "copy_gbps": round(copy),
            "min_bw_fraction": min(r["fwd_bw_fraction"] for r in big or memory_bound or ours),
            "worst_speed_vs_compile": min(r["full_vs_compile"] for r in ours),
            "ce_mem_vs_eager": _mem_ratio(rows, "cross_entropy"),
            "linear_ce_mem_vs_eager": _mem_ratio(rows, "linear_cross_entropy"),
            "ops": sorted({r["op"] for r in ours})}


def _mem_ratio(rows: list[dict], op: str) -> float | None:
    """Our peak memory over eager's for `op` at the vocabulary nearest 128k."""
    peaks = {(r["impl"], r["hidden"]): r["peak_mib"] for r in rows if r["op"] == op}
    if not peaks:
        return None
    vocab = min({v for _, v in peaks}, key=lambda v: abs(v - 131072))
    eager = peaks.get(("eager", vocab))
    return round(peaks[("mlpe", vocab)] / eager, 3) if eager else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", default="1024,2048,4096,8192,16384",
                   help="hidden sizes to sweep (1024,2048,4096,8192,16384)")
    p.add_argument("--tokens", type=int, default=8192, help="rows (tokens) per call (8192)")
    p.add_argument("--vocab", default="32768,65536,131072,262144",
                   help="vocabulary sizes for the cross-entropy ops "
                   "(32768,65536,131072,262144)")
    p.add_argument("--lm-hidden", type=int, default=4096,
                   help="hidden size of linear_cross_entropy's LM head (4096)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--csv", default=None, metavar="FILE", help="write every row here")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="also draw the rows (mlpe.kernels.plot) into this .png or .svg")
    p.add_argument("--ops", default=",".join(OPS), help=f"which ops ({','.join(OPS)})")


def from_args(args) -> dict:
    import torch

    try:
        hidden = [int(h) for h in args.hidden.split(",")]
        vocab = [int(v) for v in args.vocab.split(",")]
    except ValueError:
        raise RuntimeError(f"--hidden {args.hidden!r} / --vocab {args.vocab!r}: expected "
                           "sizes like 1024,4096") from None
    ops = [op for op in args.ops.split(",") if op]
    unknown = sorted(set(ops) - set(OPS))
    if unknown or not ops:
        raise RuntimeError(f"--ops {args.ops!r}: expected some of {', '.join(OPS)}")
    return run(hidden, args.tokens, getattr(torch, args.dtype), args.csv, ops, vocab,
               args.lm_hidden, args.plot)


def register(sub) -> None:
    """`mlpe bench kernels`."""
    p = sub.add_parser("kernels", help="fused kernels vs PyTorch eager and torch.compile "
                       "(GPU; says so without one)", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(bench=lambda args, settings: from_args(args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlpe.kernels.bench", description=__doc__)
    add_arguments(p)
    try:
        result = from_args(p.parse_args(argv))
    except RuntimeError as err:
        p.error(str(err))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
