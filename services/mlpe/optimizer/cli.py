"""`mlpe plan` and `mlpe advise`: the planner and the job advisor from the shell. They run
in-process by default (no server needed); `--server HOST:PORT` asks `mlpe optimizer`."""

from __future__ import annotations

import argparse
import json
import sys

from mlpe.common.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("optimizer", help="the planner as a gRPC service (PlanTraining, "
                       "ExplainPlan, AdviseJob), plans cached in Redis",
                       description="Serves mlpe.v1.Optimizer with health and reflection on "
                       "$MLPE_OPTIMIZER_PORT (50051).")
    s.add_argument("--listen", default=None,
                   help="address to serve on (default 0.0.0.0:$MLPE_OPTIMIZER_PORT)")
    s.add_argument("--no-cache", action="store_true", help="do not cache plans in Redis")
    s.set_defaults(func=run_server)

    p = sub.add_parser("plan", help="rank parallel layouts of a model on a cluster: memory "
                       "per GPU, step time, tokens/s, MFU",
                       description="e.g. mlpe plan --model llama3-70b --cluster 16x8xH100 "
                       "--global-batch 1024 --seq 8192")
    p.add_argument("--model", required=True,
                   help="preset (gpt2-small…xl, llama2-7b/13b/70b, llama3-8b/70b/405b, "
                   "mixtral-8x7b); --layers etc. override its dimensions")
    for flag in ("layers", "hidden", "heads", "kv-heads", "ffn", "vocab", "experts", "top-k"):
        p.add_argument(f"--{flag}", type=int, default=0, help=f"model {flag}")
    p.add_argument("--cluster", required=True,
                   help="NODESxGPUSxTYPE, e.g. 16x8xH100 (A100-40GB, A100, H100, H200)")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per step")
    p.add_argument("--seq", type=int, default=0, help="sequence length (the model's)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp8"))
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "adafactor"))
    p.add_argument("--objective", default="throughput",
                   choices=("throughput", "fewest_gpus", "fit", "cheapest"),
                   help="throughput (most tokens/s on all the GPUs), fewest_gpus, fit (most "
                   "headroom), cheapest (lowest cost per token on any GPU count)")
    p.add_argument("--pricing", default="on_demand", choices=("on_demand", "spot"),
                   help="the GPU price costs use (the price table: $MLPE_PRICES)")
    p.add_argument("--layout", default="",
                   help="evaluate this layout instead of searching, e.g. "
                   "tp8,pp16,dp128,zero1,mb1,recompute=selective (parts: tpN ppN dpN cpN epN "
                   "vppN, zeroN or fsdp, mbN gaN, sp, schedule=1f1b|interleaved, "
                   "recompute=none|selective|full, offload=none|optimizer|params; left out: "
                   "1, ZeRO 0, none; dp = the GPUs left over). Exit 3 when it cannot run")
    p.add_argument("--top", type=int, default=10, help="plans shown (10)")
    p.add_argument("--explain", action="store_true", help="explain the best plan")
    p.add_argument("--json", action="store_true", help="the PlanResponse as JSON")
    p.add_argument("--server", help="ask mlpe optimizer at HOST:PORT instead")
    p.set_defaults(func=run_plan)

    a = sub.add_parser("advise", help="recommendations for a running job from its telemetry")
    a.add_argument("job_id")
    a.add_argument("--window", type=int, default=300, help="seconds of telemetry (300)")
    a.add_argument("--json", action="store_true")
    a.add_argument("--server", help="ask mlpe optimizer at HOST:PORT instead")
    a.set_defaults(func=run_advise)


def build_request(args):
    from mlpe.v1 import optimizer_pb2 as o

    model = o.ModelShape(preset=args.model)
    for flag in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "experts", "top_k"):
        setattr(model, flag, getattr(args, flag))
    return o.PlanRequest(
        model=model, cluster=o.ClusterSpec(preset=args.cluster, pricing=args.pricing),
        training=o.TrainingSpec(global_batch=args.global_batch, seq_len=args.seq,
                                precision=args.precision, optimizer=args.optimizer,
                                objective=args.objective), top_k=args.top,
        layout=args.layout)


def print_table(plans) -> None:
    currency = plans[0].currency if plans else ""
    print(f"{'#':>2} {'GPUS':>5} {'DP':>4} {'TP':>3} {'PP':>3} {'CP':>3} {'EP':>3} {'ZeRO':>4} "
          f"{'MBxGA':>7} {'RECOMP':>9} {'OFFLOAD':>9} {'MEM GiB':>9} {'STEP s':>8} "
          f"{'TOK/S':>11} {'MFU':>5} {currency + '/STEP':>10} {currency + '/1B TOK':>11}")
    for i, p in enumerate(plans, 1):
        print(f"{i:>2} {p.dp * p.tp * p.pp * p.cp:>5} {p.dp:>4} {p.tp:>3} {p.pp:>3} {p.cp:>3} "
              f"{p.ep:>3} {p.zero_stage:>4} {f'{p.micro_batch}x{p.grad_accum}':>7} "
              f"{p.recompute:>9} {p.offload:>9} "
              f"{p.memory.total_gib:>5.1f}/{p.memory.capacity_gib:<3.0f} "
              f"{p.time.total_s:>8.2f} {p.tokens_per_s:>11,.0f} {p.mfu:>5.0%} "
              f"{p.cost_per_step:>10.2f} {p.cost_per_billion_tokens:>11,.0f}")


def print_layout(response) -> None:
    """The answer for --layout: its figures, and when it cannot run, why and what can."""
    runs = bool(response.plans)
    plan = response.plans[0] if runs else response.closest if response.HasField("closest") \
        else None
    if plan is not None:
        m, t = plan.memory, plan.time
        print(f"Layout {plan.summary}" + ("" if runs else "  (CANNOT RUN)"))
        print(f"Memory per GPU: {m.total_gib:.1f} of {m.capacity_gib:.0f} GiB = weights "
              f"{m.params_gib:.2f} + gradients {m.grads_gib:.2f} + optimizer "
              f"{m.optimizer_gib:.2f} + activations {m.activations_gib:.2f} + pipeline in "
              f"flight {m.pipeline_inflight_gib:.2f} + temporary {m.temporary_gib:.2f} + "
              f"reserve {m.reserve_gib:.2f}")
        print(f"Step time {t.total_s:.3f} s = compute {t.compute_s:.3f} + exposed "
              f"communication {t.comm_exposed_s:.3f} + pipeline bubble {t.bubble_s:.3f}; "
              f"{plan.tokens_per_s:,.0f} tokens/s, MFU {plan.mfu:.1%}")
        print(f"Cost {plan.cost_per_step:,.2f} {plan.currency} per step, "
              f"{plan.cost_per_billion_tokens:,.0f} {plan.currency} per billion tokens")
    if response.problems:
        print("Cannot run:")
        for problem in response.problems:
            print(f"  - {problem}")
    if response.nearest:
        print("\nNearest layouts that run:")
        print_table(response.nearest)
    for s in response.suggestions:
        print(f"  - {s}")


def print_plans(response) -> None:
    if not response.plans:
        print("No layout fits.")
    else:
        print_table(response.plans)
    if response.HasField("closest"):
        print(f"\nClosest layout: {response.closest.summary}")
    for s in response.suggestions:
        print(f"  - {s}")
    print(f"\n{response.evaluated:,} layouts evaluated in {response.search_ms:.1f} ms"
          + (" (cached)" if response.cached else ""))


def run_plan(args, settings: Settings) -> int:
    from google.protobuf import json_format

    from mlpe.optimizer import service
    from mlpe.optimizer.errors import PlanInputError

    request = build_request(args)
    try:
        if args.server:
            import grpc

            from mlpe.v1 import optimizer_pb2_grpc

            stub = optimizer_pb2_grpc.OptimizerStub(grpc.insecure_channel(args.server))
            try:
                response = stub.PlanTraining(request, timeout=60)
                text = stub.ExplainPlan(explain_request(request, response)).text \
                    if args.explain and (response.plans or args.layout) else ""
            except grpc.RpcError as err:
                print(f"mlpe plan: {err.code().name}: {err.details()}", file=sys.stderr)
                return 2 if err.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
        else:
            response = service.plan(request)
            text = service.explain(explain_request(request, response)) \
                if args.explain and (response.plans or args.layout) else ""
    except PlanInputError as err:
        print(f"mlpe plan: {err.field}: {err.reason}", file=sys.stderr)
        return 2
    if args.json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
    else:
        (print_layout if args.layout else print_plans)(response)
        if text:
            print("\n" + text)
    return 0 if response.plans else 3


def explain_request(request, response):
    from mlpe.v1 import optimizer_pb2 as o

    if request.layout:  # the layout is named by the request itself
        return o.ExplainPlanRequest(request=request)
    return o.ExplainPlanRequest(request=request, plan=response.plans[0])


def run_advise(args, settings: Settings) -> int:
    if args.server:
        import grpc

        from mlpe.v1 import optimizer_pb2 as o
        from mlpe.v1 import optimizer_pb2_grpc

        stub = optimizer_pb2_grpc.OptimizerStub(grpc.insecure_channel(args.server))
        try:
            answer = stub.AdviseJob(o.AdviseJobRequest(job_id=args.job_id,
                                                       window_s=args.window), timeout=60)
        except grpc.RpcError as err:
            print(f"mlpe advise: {err.code().name}: {err.details()}", file=sys.stderr)
            return 2 if err.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
        recs, summary = answer.recommendations, answer.summary
    else:
        from mlpe.optimizer.server import advise

        try:
            recs, summary = advise(settings, args.job_id, args.window)
        except OSError as err:
            print(f"mlpe advise: InfluxDB not reachable: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"job_id": args.job_id, "summary": summary, "recommendations": [
            {"title": r.title, "evidence": r.evidence, "severity": r.severity,
             "expected_gain_pct": r.expected_gain_pct} for r in recs]}))
        return 0
    print(summary)
    for i, r in enumerate(recs, 1):
        gain = f" (predicted {r.expected_gain_pct:+.0f}% tokens/s)" if r.expected_gain_pct \
            else ""
        print(f"{i}. [{r.severity}] {r.title}{gain}\n   {r.evidence}")
    return 0


def run_server(args, settings: Settings) -> int:
    from mlpe.optimizer import server

    return server.run(args, settings)
