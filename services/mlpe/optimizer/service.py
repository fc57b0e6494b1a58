"""Requests to plans and back: proto ⇄ planner, shared by the gRPC server and `mlpe plan`.

`plan(request)` validates the request (PlanInputError names the field), runs the search
and returns a PlanResponse; the server adds a Redis cache keyed by the request's hash.
"""

from __future__ import annotations

import functools
import hashlib
import time

from mlpe.common import prices
from mlpe.common.settings import load as load_settings
from mlpe.optimizer import fixed, planner
from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.explain import explain as explain_plan
from mlpe.optimizer.hardware import GPUS, Cluster, parse_cluster
from mlpe.optimizer.models import build_model
from mlpe.optimizer.search import OBJECTIVES, Training, build_training
from mlpe.v1 import optimizer_pb2 as o

GIB = 2**30
MODEL_FIELDS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len",
                "experts", "top_k")


def request_hash(request: o.PlanRequest) -> str:
    # Deterministic serialisation: the same request always hashes the same.
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()[:32]


def model_of(m: o.ModelShape):
    overrides = {f: getattr(m, f) for f in MODEL_FIELDS if getattr(m, f)}
    for f in MODEL_FIELDS:
        if getattr(m, f) < 0:
            raise PlanInputError(f"model.{f}", f"must be ≥ 0 (0 = the preset's), got "
                                 f"{getattr(m, f)}")
    if m.ffn_type:
        overrides["ffn_type"] = m.ffn_type
    if m.tied:
        overrides["tied"] = True
    return build_model(m.preset or None, **overrides)


def cluster_of(c: o.ClusterSpec) -> Cluster:
    if c.preset:
        cluster = parse_cluster(c.preset)
    else:
        if c.nodes < 1:
            raise PlanInputError("cluster.nodes", f"must be ≥ 1, got {c.nodes}")
        if c.gpus_per_node < 1:
            raise PlanInputError("cluster.gpus_per_node", f"must be ≥ 1, got "
                                 f"{c.gpus_per_node}")
        cluster = parse_cluster(f"{c.nodes}x{c.gpus_per_node}x{c.gpu or 'h100-sxm'}")
    for name in ("intra_node_gbps", "inter_node_gbps"):
        if getattr(c, name) < 0:
            raise PlanInputError(f"cluster.{name}", f"must be ≥ 0, got {getattr(c, name)}")
    if c.intra_node_gbps or c.inter_node_gbps:
        cluster = Cluster(cluster.nodes, cluster.gpus_per_node, cluster.gpu,
                          c.intra_node_gbps or cluster.intra_gbps,
                          c.inter_node_gbps or cluster.inter_gbps)
    return cluster


def training_of(t: o.TrainingSpec, model) -> Training:
    if t.global_batch < 1:
        raise PlanInputError("training.global_batch", f"must be ≥ 1, got {t.global_batch}")
    if t.seq_len < 0:
        raise PlanInputError("training.seq_len", f"must be ≥ 0, got {t.seq_len}")
    return build_training(global_batch=t.global_batch, seq_len=t.seq_len or model.seq_len,
                          precision=t.precision or "bf16", optimizer=t.optimizer or "adamw")


PRICINGS = ("on_demand", "spot")


@functools.lru_cache(maxsize=8)
def _table(path: str, mtime_ns: int, size: int) -> prices.PriceTable:
    return prices.load(path)


def default_prices() -> prices.PriceTable:
    """The price table of this process's settings (MLPE_PRICES), read again when the
    file changes; a broken one raises PlanInputError("prices", "<file>:<line>: …")."""
    path = load_settings().prices_path
    try:
        stat = path.stat()  # size too: two writes within one clock tick share an mtime
        return _table(str(path), stat.st_mtime_ns, stat.st_size)
    except OSError as err:
        raise PlanInputError("prices", f"{path}: cannot read the price table (MLPE_PRICES): "
                             f"{err.strerror}") from None
    except prices.PriceError as err:
        raise PlanInputError("prices", str(err)) from None


def add_costs(response: o.PlanResponse, request: o.PlanRequest, cluster,
              table: prices.PriceTable) -> None:
    """Every plan of `response` (plans, closest, nearest) costed at the cluster's GPU
    price: per step and per billion tokens."""
    pricing = request.cluster.pricing or "on_demand"
    try:
        hourly = table.per_gpu_hour(cluster.gpu.name, pricing)
    except prices.PriceError as err:
        raise PlanInputError("prices", str(err)) from None
    plans = [*response.plans, *response.nearest,
             *([response.closest] if response.HasField("closest") else [])]
    for plan in plans:
        gpus = plan.dp * plan.tp * plan.pp * plan.cp
        plan.cost_per_step = plan.time.total_s * gpus * hourly / 3600
        plan.cost_per_billion_tokens = (1e9 / plan.tokens_per_s * gpus * hourly / 3600
                                        if plan.tokens_per_s else 0.0)
        plan.currency = table.currency


def plan_proto(p, capacity_gib: float) -> o.Plan:
    m = p.memory
    return o.Plan(
        dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, sequence_parallel=p.sp,
        zero_stage=p.zero_stage, fsdp=p.fsdp, micro_batch=p.micro_batch,
        grad_accum=p.grad_accum, recompute=p.recompute, offload=p.offload,
        memory=o.MemoryBreakdown(
            params_gib=m.params / GIB, grads_gib=m.grads / GIB, optimizer_gib=m.optimizer / GIB,
            activations_gib=m.activations / GIB, pipeline_inflight_gib=m.pipeline_inflight / GIB,
            temporary_gib=m.temporary / GIB, reserve_gib=m.reserve / GIB,
            total_gib=m.total / GIB, capacity_gib=capacity_gib),
        time=o.StepTime(compute_s=p.time.compute_s, comm_exposed_s=p.time.comm_exposed_s,
                        bubble_s=p.time.bubble_s, total_s=p.time.total_s),
        tokens_per_s=p.tokens_per_s, mfu=p.mfu, fits=p.fits, summary=summary(p, capacity_gib))


def summary(p, capacity_gib: float) -> str:
    layout = f"dp{p.dp} tp{p.tp} pp{p.pp}" + (f" cp{p.cp}" if p.cp > 1 else "") + \
        (f" ep{p.ep}" if p.ep > 1 else "")
    extras = [f"zero{p.zero_stage}" if p.zero_stage else "", "fsdp" if p.fsdp else "",
              "sp" if p.sp else "", f"recompute={p.recompute}" if p.recompute != "none" else "",
              f"offload={p.offload}" if p.offload != "none" else ""]
    return (f"{layout} mb{p.micro_batch}x{p.grad_accum} {' '.join(e for e in extras if e)}"
            f" — {p.memory.total / GIB:.1f}/{capacity_gib:.0f} GiB, {p.time.total_s:.2f} s/step, "
            f"{p.tokens_per_s:,.0f} tok/s, MFU {p.mfu:.0%}").replace("  ", " ")


def inputs(request: o.PlanRequest):
    model = model_of(request.model)
    cluster = cluster_of(request.cluster)
    training = training_of(request.training, model)
    objective = request.training.objective or "throughput"
    if objective not in OBJECTIVES:
        raise PlanInputError("training.objective", f"one of {', '.join(OBJECTIVES)}; got "
                             f"{objective!r}")
    if request.cluster.pricing and request.cluster.pricing not in PRICINGS:
        raise PlanInputError("cluster.pricing", f"one of {', '.join(PRICINGS)}; got "
                             f"{request.cluster.pricing!r}")
    if request.top_k < 0 or request.top_k > 100:
        raise PlanInputError("top_k", f"between 0 and 100, got {request.top_k}")
    return model, cluster, training, objective


def plan(request: o.PlanRequest, table: prices.PriceTable | None = None) -> o.PlanResponse:
    """Raises PlanInputError for an impossible request. Costs use `table` (default: the
    settings' price table)."""
    model, cluster, training, objective = inputs(request)
    table = default_prices() if table is None else table
    response = fixed_plan(request, model, cluster, training) if request.layout else \
        searched_plan(request, model, cluster, training, objective)
    add_costs(response, request, cluster, table)
    return response


def searched_plan(request: o.PlanRequest, model, cluster, training,
                  objective: str) -> o.PlanResponse:
    t0 = time.perf_counter()
    result = planner.search(model, cluster, training, objective=objective,
                            top_k=request.top_k or 10)
    ms = (time.perf_counter() - t0) * 1e3
    capacity = cluster.gpu.memory_gib
    response = o.PlanResponse(
        plans=[plan_proto(p, capacity) for p in result.plans],
        rejected=[o.Rejection(layout=" ".join(f"{k}={v}" for k, v in r.layout.items()),
                              reason=r.reason) for r in result.rejected[:50]],
        suggestions=result.suggestions, search_ms=ms, request_hash=request_hash(request),
        evaluated=getattr(result, "evaluated", len(result.plans) + len(result.rejected)))
    if result.closest is not None:
        response.closest.CopyFrom(plan_proto(result.closest, capacity))
    return response


def fixed_plan(request: o.PlanRequest, model, cluster, training) -> o.PlanResponse:
    """The answer for request.layout: that layout evaluated (fixed.py)."""
    t0 = time.perf_counter()
    verdict = fixed.evaluate(model, cluster, training, fixed.parse_layout(request.layout))
    capacity = cluster.gpu.memory_gib
    response = o.PlanResponse(
        problems=verdict.problems, nearest=[plan_proto(p, capacity) for p in verdict.nearest],
        request_hash=request_hash(request), evaluated=verdict.evaluated,
        search_ms=(time.perf_counter() - t0) * 1e3)
    if verdict.runs:
        response.plans.append(plan_proto(verdict.plan, capacity))
    elif verdict.plan is not None:
        response.closest.CopyFrom(plan_proto(verdict.plan, capacity))
    if not verdict.runs and not verdict.nearest:
        response.suggestions.extend(planner.search(model, cluster, training).suggestions)
    return response


def explain(request: o.ExplainPlanRequest) -> str:
    model, cluster, training, objective = inputs(request.request)
    if request.request.layout:  # the named layout, whether or not it runs
        verdict = fixed.evaluate(model, cluster, training,
                                 fixed.parse_layout(request.request.layout))
        if verdict.plan is None:
            raise PlanInputError("request.layout", "; ".join(verdict.problems))
        text = explain_plan(verdict.plan, model, cluster, training)
        return text if verdict.runs else \
            text + "\n\nCannot run:\n" + "\n".join(f"  - {p}" for p in verdict.problems)
    wanted = request.plan
    result = planner.search(model, cluster, training, objective=objective, top_k=1000)
    for p in [*result.plans, *([result.closest] if result.closest else [])]:
        if (p.dp, p.tp, p.pp, p.cp, p.ep, p.zero_stage, p.micro_batch, p.recompute,
                p.offload) == (wanted.dp, wanted.tp, wanted.pp, wanted.cp or 1, wanted.ep or 1,
                               wanted.zero_stage, wanted.micro_batch, wanted.recompute,
                               wanted.offload):
            return explain_plan(p, model, cluster, training)
    raise PlanInputError("plan", "not one of the layouts PlanTraining returns for this request "
                         "(pass a plan from its answer)")


__all__ = ["GPUS", "PlanInputError", "explain", "plan", "request_hash"]
