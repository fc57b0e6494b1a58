"""`mlpe bench plan`: the planner's accuracy (what this machine can measure), its search
latency, and the gRPC server's plan requests per second.

- Accuracy: the worker's GPT run forward and backward on the CPU at several
  configurations; bytes saved for backward (through the fused kernels, in Triton's
  interpreter), parameters, gradients and AdamW states, each against the planner's
  prediction (mlpe.bench.plan_accuracy). Then the planner's generic models: bytes that
  Hugging Face llama / mistral / qwen2 / qwen3 models (fp32, eager attention) save for
  backward against its activation model (kernels="eager"), and each rank's FSDP2 shards
  (2 gloo ranks) of parameters, gradients and AdamW states for the worker's GPT and a
  Llama against its ZeRO-3 per-GPU figures.
- Published runs: each run of published_runs.yaml (Megatron-LM, Llama 3, BLOOM) with
  its own layout; the step-time constants fitted on some, the error on the others.
- Search latency: the full search for llama3-70b on 128 x 8 H100 (1,024 GPUs), global batch
  1024, sequence 8192, repeated; p50 and p99.
- Requests/s: `mlpe optimizer` on loopback with its Redis cache, 16 concurrent clients for
  `--seconds`, cycling through 32 distinct requests (the first of each a miss).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

from mlpe.common.settings import Settings, environment

SEARCH_CASE = ("llama3-70b", "128x8xH100", 1024, 8192)
# The accuracy keys of the result with --skip-accuracy (the same keys as accuracy()'s).
SKIPPED_ACCURACY = {"configs_measured": 0, "mem_err_max_pct": None,
                    "hf_configs_measured": 0, "hf_act_err_max_pct": None,
                    "hf_act_baseline_err_max_pct": None, "fsdp_configs_measured": 0,
                    "fsdp_err_max_pct": None, "accuracy_s": None}


def register(sub) -> None:
    p = sub.add_parser("plan", help="planner accuracy vs measurement, search latency, "
                       "plan requests/s", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50, help="timed searches (50)")
    p.add_argument("--seconds", type=float, default=10.0, help="load test length (10)")
    p.add_argument("--skip-accuracy", action="store_true",
                   help="leave out the (slow) CPU measurements (GPT, Hugging Face, FSDP2)")
    p.set_defaults(bench=run)


def search_latency(repeats: int) -> dict:
    from mlpe.optimizer import service
    from mlpe.v1 import optimizer_pb2 as o

    model, cluster, batch, seq = SEARCH_CASE
    request = o.PlanRequest(model=o.ModelShape(preset=model),
                            cluster=o.ClusterSpec(preset=cluster),
                            training=o.TrainingSpec(global_batch=batch, seq_len=seq))
    service.plan(request)  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        response = service.plan(request)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"search_p50_ms": round(statistics.median(times), 2),
            "search_p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 2),
            "search_evaluated": response.evaluated, "best": response.plans[0].summary
            if response.plans else None}


def requests(n: int) -> list:
    from mlpe.v1 import optimizer_pb2 as o

    models = ("gpt2-xl", "llama2-7b", "llama3-8b", "llama2-13b", "llama3-70b", "mixtral-8x7b",
              "llama2-70b", "gpt2-large")
    clusters = ("1x8xH100", "2x8xA100", "4x8xH100", "8x8xH200")
    out = []
    for i in range(n):
        out.append(o.PlanRequest(
            model=o.ModelShape(preset=models[i % len(models)]),
            cluster=o.ClusterSpec(preset=clusters[(i // len(models)) % len(clusters)]),
            training=o.TrainingSpec(global_batch=256, seq_len=4096), top_k=5))
    return out


async def load(address: str, seconds: float, concurrency: int = 16) -> dict:
    import grpc

    from mlpe.v1 import optimizer_pb2_grpc

    pool = requests(32)
    done = cached = 0
    errors: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = optimizer_pb2_grpc.OptimizerStub(channel)
        deadline = time.monotonic() + seconds

        async def client(k: int) -> None:
            nonlocal done, cached
            i = k
            while time.monotonic() < deadline:
                try:
                    answer = await stub.PlanTraining(pool[i % len(pool)], timeout=30)
                except grpc.RpcError as err:
                    errors.append(f"{err.code().name}: {err.details()}")
                    return
                done += 1
                cached += answer.cached
                i += concurrency
        t0 = time.monotonic()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        elapsed = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"plan requests failed: {errors[0]}")
    return {"requests_per_s": round(done / elapsed, 1), "requests": done,
            "cache_hit_ratio": round(cached / max(done, 1), 3)}


def _print_rows(rows: list[dict], extra=lambda r: "") -> None:
    width = max([40] + [len(r["config"]) for r in rows])
    for r in rows:
        print(f"  {r['config']:{width}s} {r['component']:12s} predicted "
              f"{r['predicted'] / 2**20:10.2f} MiB  measured {r['measured'] / 2**20:10.2f}"
              f" MiB  error {r['error_pct']:+.2f}%{extra(r)}", flush=True)


def _max_error(rows: list[dict], key: str = "error_pct") -> float:
    return round(max(abs(r[key]) for r in rows), 2)


def accuracy() -> dict:
    """The CPU measurements against the planner: the worker's GPT (its own path), Hugging
    Face activations and FSDP2 states (the generic models)."""
    from mlpe.bench.plan_accuracy import (
        FSDP_WORLD,
        accuracy_table,
        fsdp_table,
        hf_activation_table,
    )

    t0 = time.perf_counter()
    print("measuring the worker's GPT on the CPU (fused kernels in Triton's "
          "interpreter) …", flush=True)
    rows = accuracy_table()
    _print_rows(rows)
    print("Hugging Face models (fp32, eager attention): saved for backward vs the generic "
          "activation model (kernels=eager; Korthikanti's fused count in brackets) …",
          flush=True)
    hf = hf_activation_table()
    _print_rows(hf, lambda r: f"  [fused count "
                f"{100 * (r['baseline'] - r['measured']) / r['measured']:+.2f}%]")
    print(f"FSDP2 over {FSDP_WORLD} gloo ranks: the largest rank's local shards vs ZeRO-3 "
          "per GPU …", flush=True)
    fsdp = fsdp_table()
    _print_rows(fsdp, lambda r: f"  (dim-0 padding {r['padding']:,} B)")
    return {"configs_measured": len({r["config"] for r in rows}),
            "mem_err_max_pct": _max_error(rows),
            "hf_configs_measured": len(hf), "hf_act_err_max_pct": _max_error(hf),
            "hf_act_baseline_err_max_pct": _max_error(hf, "baseline_error_pct"),
            "fsdp_configs_measured": len({r["config"] for r in fsdp}),
            "fsdp_err_max_pct": _max_error(fsdp),
            "accuracy_s": round(time.perf_counter() - t0, 1)}


def published_runs() -> dict:
    """The planner against published runs (published.py): the constants fitted on the
    runs marked fit, the error on the others, and the error of the shipped constants."""
    from mlpe.bench import published

    runs = published.load()
    print(f"published runs: {len(runs)} ({sum(r.fit for r in runs)} to fit the step-time "
          "constants, the rest judged) …", flush=True)
    constants, achievable = published.calibrate(runs)
    fitted = published.report(runs, constants, achievable)
    shipped = published.report(runs)
    for row, plain in zip(fitted["published_runs"], shipped["published_runs"], strict=True):
        print(f"  {row['name']:28s} {row['gpus']:6d} x {row['gpu']:10s} {row['layout']:34s} "
              f"measured {row['measured_tokens_per_s']:>10,} tok/s  predicted "
              f"{row['predicted_tokens_per_s']:>10,} ({row['error_pct']:+6.1f}%; shipped "
              f"constants {plain['error_pct']:+6.1f}%)"
              f"{'  [fit]' if row['used_to_fit'] else ''}", flush=True)
    print(f"  held out: error p50 {fitted['published_err_p50_pct']}% / max "
          f"{fitted['published_err_max_pct']}% (shipped constants: "
          f"{shipped['published_err_p50_pct']}% / {shipped['published_err_max_pct']}%); "
          f"fitted {constants}, achievable {achievable}", flush=True)
    return {**fitted, "published_fitted": {**{k: v for k, v in vars(constants).items()},
                                           "achievable": achievable},
            "published_shipped_err_p50_pct": shipped["published_err_p50_pct"],
            "published_shipped_err_max_pct": shipped["published_err_max_pct"]}


def run(args, settings: Settings) -> dict:
    import grpc

    from mlpe import stack
    from mlpe.common.grpc_server import wait_serving
    from mlpe.common.process import free_port, stop_child

    result: dict = {"bench": "plan"}
    result.update(SKIPPED_ACCURACY if args.skip_accuracy else accuracy())
    result.update(published_runs())
    result.update(search_latency(args.repeats))
    print(f"search, {SEARCH_CASE[0]} on {SEARCH_CASE[1]}: p50 {result['search_p50_ms']} ms, "
          f"p99 {result['search_p99_ms']} ms ({result['search_evaluated']:,} layouts); best: "
          f"{result['best']}", flush=True)

    stack.up(settings, ("redis",))
    port = free_port()
    namespace = f"bench-{os.getpid()}"
    env = environment(MLPE_CONTROL_NAMESPACE=namespace)
    server = subprocess.Popen([sys.executable, "-m", "mlpe.cli", "optimizer", "--listen",
                               f"127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        wait_serving(grpc.insecure_channel(f"127.0.0.1:{port}"), server, "mlpe optimizer",
                     log=lambda: server.stderr.read()[-2000:].decode(errors="replace")
                     if server.poll() is not None else "")
        result.update(asyncio.run(load(f"127.0.0.1:{port}", args.seconds)))
    finally:
        stop_child(server, timeout=30)
        import redis

        client = redis.Redis.from_url(settings.redis_url)
        for key in client.scan_iter(f"{namespace}:plan:*"):
            client.delete(key)
    print(f"server: {result['requests_per_s']} plan requests/s over {args.seconds:.0f} s "
          f"(16 clients, 32 distinct requests, cache hit ratio {result['cache_hit_ratio']})")
    return result
