"""The parallelism planner: every layout of a model on a cluster, ranked.

A layout is tensor (tp), pipeline (pp, with v interleaved chunks per stage), context (cp),
expert (ep, MoE only) and data (dp) parallel sizes with tp * pp * cp * dp = GPUs, a
micro-batch size (grad_accum = global batch / dp / micro-batch micro-batches per step),
a ZeRO stage, a recomputation policy and, only when nothing fits without, offload.
Enumerated:
- tp: divisors of the GPUs per node (tensor parallelism stays on NVLink) that divide the
  heads, the kv heads and the MLP width; sequence parallelism is always on with tp > 1 (the
  same communication volume as plain TP, less memory);
- pp: divisors of GPUs / tp up to the layer count; pp need not divide the layers (stages
  get ceil(layers / pp) or one fewer, the fullest sets the pace: Llama 3 405B put 126
  layers on 16 stages) as long as the imbalance stays under MAX_PP_IMBALANCE; interleaved
  chunks v in (2, 4) when v * pp divides the layers and pp divides the micro-batches;
- cp: powers of two with sequences of at least CP_MIN_TOKENS tokens per rank (ring
  attention splits each sequence in 2 cp chunks);
- ep: divisors of the experts that divide dp;
- micro-batch: divisors of the per-replica batch, up to MAX_MICRO_BATCH;
- ZeRO stage 0-3 (stage 3 is FSDP's full sharding: `fsdp` is set for it), recomputation
  none / selective / full.
All candidates are evaluated at once with numpy (memory.memory_arrays, timing.time_arrays:
the same formulas the single-plan functions use), so a search of ~10^4 candidates takes a
few milliseconds; Plan objects are built only for the ranked top_k and the closest miss.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import numpy as np

from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.hardware import GPUS, HOST_USABLE, Cluster, parse_cluster
from mlpe.optimizer.memory import (
    GIB,
    OFFLOAD,
    OPTIMIZERS,
    PRECISIONS,
    RECOMPUTE,
    RESERVE_BYTES,
    MemoryBreakdown,
    breakdown,
    memory_arrays,
    plan_memory,
    state_bytes_per_param,
)
from mlpe.optimizer.models import ModelShape, build_model
from mlpe.optimizer.timing import StepTime, bubble_fraction, plan_time, step_time, time_arrays

OBJECTIVES = ("throughput", "fewest_gpus", "fit")
MAX_MICRO_BATCH = 64
CP_MIN_TOKENS = 1024
CP_SIZES = (1, 2, 4, 8, 16, 32)
VIRTUAL_STAGES = (1, 2, 4)
MAX_PP_IMBALANCE = 1.10  # ceil(L / p) * p / L
ZERO_STAGES = (0, 1, 2, 3)


@dataclasses.dataclass(frozen=True)
class Training:
    global_batch: int  # sequences per optimizer step
    seq_len: int
    precision: str = "bf16"  # "fp32" | "bf16" | "fp8"
    optimizer: str = "adamw"  # "adamw" | "sgd" | "adafactor"
    flash_attention: bool = True  # attention scores never stored (Korthikanti's 5as/h term)

    def __post_init__(self):
        for name in ("global_batch", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanInputError(f"training.{name}", f"must be a whole number ≥ 1, got "
                                                         f"{value!r}")
        if self.precision not in PRECISIONS:
            raise PlanInputError("training.precision", f"must be one of "
                                                       f"{', '.join(PRECISIONS)}, got "
                                                       f"{self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise PlanInputError("training.optimizer", f"must be one of "
                                                       f"{', '.join(OPTIMIZERS)}, got "
                                                       f"{self.optimizer!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def build_training(global_batch: int, seq_len: int, precision: str = "bf16",
                   optimizer: str = "adamw", flash_attention: bool = True) -> Training:
    """A validated Training; bad values raise PlanInputError("training.<field>")."""
    return Training(global_batch, seq_len, str(precision).lower(), str(optimizer).lower(),
                    bool(flash_attention))


@dataclasses.dataclass
class Plan:
    dp: int
    tp: int
    pp: int
    cp: int
    ep: int
    sp: bool
    zero_stage: int
    fsdp: bool  # ZeRO-3 / FSDP full sharding (modelled identically)
    micro_batch: int
    grad_accum: int  # micro-batches per step per data-parallel replica
    recompute: str  # "none" | "selective" | "full"
    offload: str  # "none" | "optimizer" | "params"
    memory: MemoryBreakdown
    time: StepTime
    tokens_per_s: float
    mfu: float
    fits: bool
    virtual_stages: int = 1  # interleaved pipeline chunks per stage
    gpus: int = 0  # tp * pp * cp * dp
    capacity_bytes: float = 0.0  # the GPU's memory

    @property
    def overflow_bytes(self) -> float:
        return self.memory.total - self.capacity_bytes

    def layout(self) -> dict[str, Any]:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep,
                "sp": self.sp, "zero_stage": self.zero_stage, "fsdp": self.fsdp,
                "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                "recompute": self.recompute, "offload": self.offload,
                "virtual_stages": self.virtual_stages, "gpus": self.gpus}

    def summary(self) -> str:
        pp = f"pp{self.pp}" + (f"x{self.virtual_stages}v" if self.virtual_stages > 1 else "")
        extra = "" if self.offload == "none" else f" offload={self.offload}"
        return (f"tp{self.tp} {pp} cp{self.cp}{f' ep{self.ep}' if self.ep > 1 else ''} "
                f"dp{self.dp} zero{self.zero_stage} mb{self.micro_batch}x{self.grad_accum} "
                f"recompute={self.recompute}{extra}: {self.memory.total / GIB:.1f} GiB, "
                f"{self.tokens_per_s:,.0f} tokens/s, MFU {100 * self.mfu:.1f}%")


@dataclasses.dataclass
class Rejection:
    layout: dict
    reason: str


@dataclasses.dataclass
class SearchResult:
    plans: list[Plan]  # fitting plans, best first by the objective
    rejected: list[Rejection]
    closest: Plan | None  # when nothing fits: the smallest memory overflow
    suggestions: list[str]
    evaluated: int = 0  # candidates evaluated
    elapsed_ms: float = 0.0


# -- enumeration ------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclasses.dataclass
class _Candidates:
    """Every candidate of one world size, as parallel numpy arrays."""
    world: int
    arrays: dict[str, np.ndarray]
    group_starts: np.ndarray  # candidates of one (tp, pp, cp, ep, v) are contiguous
    groups: list[dict]
    rejected: list[Rejection]

    @property
    def size(self) -> int:
        return len(self.arrays["tp"])


def _enumerate(model: ModelShape, training: Training, world: int, gpus_per_node: int,
               offload: tuple[int, ...]) -> _Candidates:
    rejected: list[Rejection] = []
    layouts: list[tuple[int, int, int, int, int, int, list[int]]] = []
    for tp in _divisors(min(gpus_per_node, world)):
        problem = next((f"{name} {value} not divisible by tp {tp}" for name, value in
                        (("heads", model.heads), ("kv_heads", model.kv_heads),
                         ("ffn", model.ffn)) if value % tp), None)
        if problem:
            rejected.append(Rejection({"tp": tp}, problem))
            continue
        for pp in _divisors(world // tp):
            if pp > model.layers:
                break
            imbalance = math.ceil(model.layers / pp) * pp / model.layers
            if imbalance > MAX_PP_IMBALANCE:
                rejected.append(Rejection(
                    {"tp": tp, "pp": pp},
                    f"layers {model.layers} not divisible by pp {pp} (stages of "
                    f"{math.ceil(model.layers / pp)} layers: {100 * (imbalance - 1):.0f}% "
                    f"imbalance)"))
                continue
            for cp in CP_SIZES:
                if (world // tp // pp) % cp:
                    break
                if cp > 1 and (training.seq_len % (2 * cp)
                               or training.seq_len // cp < CP_MIN_TOKENS):
                    break
                dp = world // (tp * pp * cp)
                if training.global_batch % dp:
                    rejected.append(Rejection(
                        {"tp": tp, "pp": pp, "cp": cp, "dp": dp},
                        f"global batch {training.global_batch} not divisible by dp {dp}"))
                    continue
                local = training.global_batch // dp
                mbs = [b for b in _divisors(local) if b <= MAX_MICRO_BATCH]
                eps = [e for e in _divisors(model.experts) if dp % e == 0] if model.moe \
                    else [1]
                for ep in eps:
                    for v in VIRTUAL_STAGES:
                        if v > 1 and (pp == 1 or model.layers % (pp * v)):
                            continue
                        ok = mbs if v == 1 else [b for b in mbs if (local // b) % pp == 0]
                        if ok:
                            layouts.append((tp, pp, cp, ep, v, dp, ok))
    groups = [{"tp": tp, "pp": pp, "cp": cp, "ep": ep, "virtual_stages": v, "dp": dp}
              for tp, pp, cp, ep, v, dp, _ in layouts]
    # Candidates: layout x micro-batch x ZeRO stage x recompute x offload, grouped by layout.
    per_mb = [(i, b) for i, (*_, mbs) in enumerate(layouts) for b in mbs]
    combos = [(z, r, o) for o in offload for z in ZERO_STAGES for r in range(len(RECOMPUTE))
              if not (o == 1 and z == 0) and not (o == 2 and z != 3)]
    n_combo = len(combos)
    if not per_mb:
        empty = {k: np.zeros(0) for k in ("tp", "pp", "cp", "ep", "virtual_stages", "dp",
                                          "micro_batch", "grad_accum", "zero_stage",
                                          "recompute", "offload")}
        return _Candidates(world, empty, np.zeros(0, dtype=int), groups, rejected)
    lay_idx = np.repeat(np.array([i for i, _ in per_mb]), n_combo)
    mb = np.repeat(np.array([b for _, b in per_mb], dtype=float), n_combo)
    combo = np.tile(np.array(combos), (len(per_mb), 1))
    table = np.array([lay[:6] for lay in layouts], dtype=float)
    arrays = {name: table[lay_idx, col] for col, name in
              enumerate(("tp", "pp", "cp", "ep", "virtual_stages", "dp"))}
    arrays["micro_batch"] = mb
    arrays["grad_accum"] = training.global_batch / arrays["dp"] / mb
    arrays["zero_stage"] = combo[:, 0]
    arrays["recompute"] = combo[:, 1]
    arrays["offload"] = combo[:, 2]
    # Without data (or context) parallel ranks there is nothing to shard: ZeRO 1-3 are
    # ZeRO 0 (offload still needs its stage).
    keep = ~((arrays["dp"] * arrays["cp"] == 1) & (arrays["zero_stage"] > 0)
             & (arrays["offload"] == 0))
    if not keep.all():
        arrays = {k: x[keep] for k, x in arrays.items()}
        lay_idx = lay_idx[keep]
    starts = np.flatnonzero(np.r_[True, lay_idx[1:] != lay_idx[:-1]])
    return _Candidates(world, arrays, starts, groups, rejected)


def _evaluate(model: ModelShape, cluster: Cluster, training: Training,
              cands: _Candidates) -> dict[str, Any]:
    a = cands.arrays
    layout = {k: a[k] for k in ("tp", "pp", "cp", "dp", "ep", "zero_stage", "recompute",
                                "offload", "micro_batch", "grad_accum", "virtual_stages")}
    mem = memory_arrays(model, training.seq_len, training.precision, training.optimizer,
                        flash=training.flash_attention, **layout)
    out = {"mem": mem, "fits": (mem["total"] <= cluster.gpu.memory_bytes)
           & (mem["host_offload"] <= cluster.host_bytes_per_gpu)}
    out["time"] = time_arrays(model, cluster, training.seq_len, training.global_batch,
                              training.precision, training.optimizer, **layout)
    return out


def _plan(cands: _Candidates, ev: dict, i: int, cluster: Cluster) -> Plan:
    a = cands.arrays
    tp = int(a["tp"][i])
    zero = int(a["zero_stage"][i])
    times = ev["time"]
    return Plan(dp=int(a["dp"][i]), tp=tp, pp=int(a["pp"][i]), cp=int(a["cp"][i]),
                ep=int(a["ep"][i]), sp=tp > 1, zero_stage=zero, fsdp=zero == 3,
                micro_batch=int(a["micro_batch"][i]), grad_accum=int(a["grad_accum"][i]),
                recompute=RECOMPUTE[int(a["recompute"][i])],
                offload=OFFLOAD[int(a["offload"][i])], memory=breakdown(ev["mem"], i),
                time=step_time(times, i), tokens_per_s=float(times["tokens_per_s"][i]),
                mfu=float(times["mfu"][i]), fits=bool(ev["fits"][i]),
                virtual_stages=int(a["virtual_stages"][i]), gpus=cands.world,
                capacity_bytes=float(cluster.gpu.memory_bytes))


def _oom_rejections(cands: _Candidates, ev: dict, capacity: float) -> list[Rejection]:
    """One rejection per layout none of whose candidates fits, for its smallest need."""
    if not cands.size:
        return []
    fits_any = np.logical_or.reduceat(ev["fits"], cands.group_starts)
    need = np.minimum.reduceat(ev["mem"]["total"], cands.group_starts)
    out = []
    for g in np.flatnonzero(~fits_any):
        out.append(Rejection(dict(cands.groups[g]),
                             f"out of memory by {(need[g] - capacity) / GIB:.1f} GiB (needs "
                             f"{need[g] / GIB:.1f} of {capacity / GIB:.0f})"))
    return out


def _rank(ev: dict, idx: np.ndarray, objective: str) -> np.ndarray:
    total = ev["mem"]["total"][idx]
    speed = ev["time"]["tokens_per_s"][idx]
    if objective == "fit":  # most headroom, to the half GiB; then the fastest
        return idx[np.lexsort((-speed, np.round(total / GIB * 2)))]
    return idx[np.lexsort((total, -speed))]


def _top(cands: _Candidates, ev: dict, objective: str, k: int, cluster: Cluster):
    """The best k fitting candidates, leaving out those that differ from a better one
    only in ZeRO stage at the same speed (the lower-memory one is listed)."""
    if k <= 0:
        return []
    a = cands.arrays
    out, seen = [], set()
    for i in _rank(ev, np.flatnonzero(ev["fits"]), objective):
        key = tuple(a[name][i] for name in ("tp", "pp", "cp", "ep", "virtual_stages",
                                            "micro_batch", "recompute", "offload"))
        speed = round(float(ev["time"]["tokens_per_s"][i]), 3)
        if (key, speed) in seen:
            continue
        seen.add((key, speed))
        out.append(_plan(cands, ev, int(i), cluster))
        if len(out) >= k:
            break
    return out


def _states_lower_bound(model: ModelShape, training: Training, world: int) -> float:
    """Per-GPU bytes no layout of `world` GPUs can go below without offload: the
    weights, gradients and optimizer state fully sharded over every GPU."""
    p_b, g_b, o_b = state_bytes_per_param(training.precision, training.optimizer,
                                          model.hidden)
    return (p_b + g_b + o_b) * model.params() / world + RESERVE_BYTES


def _worlds(cluster: Cluster) -> list[int]:
    """GPU counts to try for fewest_gpus: divisors of one node, then whole nodes."""
    return _divisors(cluster.gpus_per_node) + [n * cluster.gpus_per_node
                                               for n in range(2, cluster.nodes + 1)]


# -- search -----------------------------------------------------------------------------------
def search(model: ModelShape, cluster: Cluster, training: Training,
           objective: str = "throughput", top_k: int = 10,
           suggest: bool = True) -> SearchResult:
    """Rank the layouts of `model` on `cluster` for `training`.

    objective "throughput": fitting plans on all the GPUs, most tokens/s first;
    "fewest_gpus": the smallest GPU count (whole nodes, or part of one node) on which
    plans fit, most tokens/s first within it; "fit": fitting plans, least memory first.
    Offload is only tried when nothing fits without. When nothing fits at all, `closest`
    is the candidate with the smallest overflow and `suggestions` say what would fit."""
    started = time.perf_counter()
    if objective not in OBJECTIVES:
        raise PlanInputError("objective", f"must be one of {', '.join(OBJECTIVES)}, got "
                                          f"{objective!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise PlanInputError("top_k", f"must be a whole number ≥ 1, got {top_k!r}")
    if training.precision == "fp8" and not cluster.gpu.fp8_tflops:
        raise PlanInputError("training.precision", f"{cluster.gpu.name} has no fp8 tensor "
                                                   "cores")
    capacity = float(cluster.gpu.memory_bytes)
    worlds = _worlds(cluster) if objective == "fewest_gpus" else [cluster.world]
    evaluated = 0
    plans: list[Plan] = []
    rejected: list[Rejection] = []
    tried: list[tuple[_Candidates, dict]] = []
    for offload in ((0,), (1, 2)):
        for world in worlds:
            if offload == (0,) and len(worlds) > 1 and \
                    _states_lower_bound(model, training, world) > capacity:
                continue
            cands = _enumerate(model, training, world, cluster.gpus_per_node, offload)
            ev = _evaluate(model, cluster, training, cands)
            evaluated += cands.size
            tried.append((cands, ev))
            if world == cluster.world and offload == (0,):
                rejected = cands.rejected + _oom_rejections(cands, ev, capacity)
            plans += _top(cands, ev, objective, top_k - len(plans), cluster)
            if len(plans) >= top_k:
                break
        if plans:
            break
    if objective == "fewest_gpus":
        plans.sort(key=lambda p: (p.gpus, -p.tokens_per_s))
    if not plans and not any(c.world == cluster.world and not c.arrays["offload"].any()
                             for c, _ in tried):
        cands = _enumerate(model, training, cluster.world, cluster.gpus_per_node, (0,))
        ev = _evaluate(model, cluster, training, cands)
        evaluated += cands.size
        tried.append((cands, ev))
        rejected = cands.rejected + _oom_rejections(cands, ev, capacity)
    closest = None
    if not plans:  # the smallest overflow of GPU memory, without offload
        best = None
        for cands, ev in tried:
            if not cands.size or cands.arrays["offload"].max() > 0:
                continue
            i = int(np.argmin(ev["mem"]["total"]))
            if best is None or ev["mem"]["total"][i] < best[1]["mem"]["total"][best[2]]:
                best = (cands, ev, i)
        if best is not None:
            closest = _plan(best[0], best[1], best[2], cluster)
    suggestions: list[str] = []
    if not plans and closest is None:
        reasons = sorted({r.reason for r in rejected})
        suggestions = [f"no layout of {cluster.world} GPUs is possible ("
                       f"{'; '.join(reasons[:3]) or 'no candidates'}): change the GPU "
                       "count or the global batch"]
    elif suggest and (closest is not None or plans[0].offload != "none"):
        suggestions = _suggest(model, cluster, training, closest, plans)
    return SearchResult(plans[:top_k], rejected, closest, suggestions, evaluated,
                        (time.perf_counter() - started) * 1e3)


def _fits_somewhere(model: ModelShape, cluster: Cluster, training: Training) -> Plan | None:
    """The fastest plan without offload on all of `cluster`, or None."""
    if _states_lower_bound(model, training, cluster.world) > cluster.gpu.memory_bytes:
        return None
    cands = _enumerate(model, training, cluster.world, cluster.gpus_per_node, (0,))
    ev = _evaluate(model, cluster, training, cands)
    top = _top(cands, ev, "throughput", 1, cluster)
    return top[0] if top else None


def _suggest(model: ModelShape, cluster: Cluster, training: Training, closest: Plan | None,
             plans: list[Plan]) -> list[str]:
    out = []
    # More nodes of the same kind: double until a plan fits, then bisect back.
    hi, found = cluster.nodes, None
    for _ in range(16):
        hi *= 2
        found = _fits_somewhere(model, dataclasses.replace(cluster, nodes=hi), training)
        if found:
            break
    if found:
        lo = max(cluster.nodes, hi // 2)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            plan = _fits_somewhere(model, dataclasses.replace(cluster, nodes=mid), training)
            if plan:
                hi, found = mid, plan
            else:
                lo = mid
        out.append(f"use at least {hi} nodes ({hi * cluster.gpus_per_node} GPUs) of "
                   f"{cluster.gpus_per_node}x{cluster.gpu.name} instead of {cluster.nodes}: "
                   f"{found.summary()}")
    else:
        out.append("no cluster of up to "
                   f"{cluster.nodes * 2**16} nodes fits it without offload: shorten the "
                   "sequence or the global batch")
    if closest is not None:
        layout = {k: getattr(closest, k) for k in ("tp", "pp", "cp", "dp", "ep",
                                                   "micro_batch", "grad_accum",
                                                   "virtual_stages", "zero_stage")}
        layout["recompute"], layout["offload"] = closest.recompute, closest.offload
        over = closest.overflow_bytes

        def saving(**change):
            mem = plan_memory(model, training.seq_len, training.precision, training.optimizer,
                              flash=training.flash_attention, **{**layout, **change})
            return closest.memory.total - mem.total

        def verdict(saved):
            return "enough to fit" if saved >= over else \
                f"still {(over - saved) / GIB:.1f} GiB short"

        out.insert(0, f"closest plan: {closest.summary()} (over by {over / GIB:.1f} GiB)")
        if closest.recompute != "full":
            s = saving(recompute="full")
            out.append(f"full recomputation saves {s / GIB:.1f} GiB per GPU: {verdict(s)}")
        if closest.micro_batch > 1:
            s = saving(micro_batch=1, grad_accum=closest.grad_accum * closest.micro_batch)
            out.append(f"micro-batch 1 instead of {closest.micro_batch} saves "
                       f"{s / GIB:.1f} GiB: {verdict(s)}")
        host = cluster.host_memory_gib
        for what, change in (("optimizer offload to CPU memory",
                              {"offload": "optimizer", "zero_stage": max(1, closest.zero_stage)}),
                             ("weight and optimizer offload (ZeRO-Infinity)",
                              {"offload": "params", "zero_stage": 3})):
            s = saving(**change)
            mem = plan_memory(model, training.seq_len, training.precision, training.optimizer,
                              flash=training.flash_attention, **{**layout, **change})
            need = mem.host_offload * cluster.gpus_per_node / GIB
            room = ("" if need <= host * HOST_USABLE else
                    f", but needs {need:,.0f} GiB of CPU memory per node (has {host:,.0f})")
            out.append(f"{what} saves {s / GIB:.1f} GiB per GPU: {verdict(s)}{room}")
    elif plans and plans[0].offload != "none":
        out.insert(0, "fits only with offload to CPU memory (slow)")
    for gpu in GPUS.values():
        if gpu.memory_gib > cluster.gpu.memory_gib and (
                training.precision != "fp8" or gpu.fp8_tflops):
            bigger = dataclasses.replace(cluster, gpu=gpu, intra_gbps=0.0, inter_gbps=0.0)
            plan = _fits_somewhere(model, bigger, training)
            if plan:
                out.append(f"on {cluster.nodes}x{cluster.gpus_per_node} {gpu.name} "
                           f"({gpu.memory_gib:.0f} GiB) it fits: {plan.summary()}")
                break
    return out


# -- explanation ------------------------------------------------------------------------------
def explain(plan: Plan, model: ModelShape, cluster: Cluster, training: Training) -> str:
    """A readable account of a plan: the layout and why, memory per GPU, step time."""
    gib = plan.memory.gib()
    cap = cluster.gpu.memory_gib
    gpn = cluster.gpus_per_node
    layers = math.ceil(model.layers / plan.pp)
    lines = [
        f"{model.describe()}",
        f"on {plan.gpus or cluster.world} x {cluster.gpu.name} ({cluster}), global batch "
        f"{training.global_batch} x {training.seq_len} tokens, {training.precision}, "
        f"{training.optimizer}",
        "",
        f"Layout: tp {plan.tp} x pp {plan.pp}"
        + (f" ({plan.virtual_stages} interleaved chunks)" if plan.virtual_stages > 1 else "")
        + f" x cp {plan.cp} x dp {plan.dp}" + (f", ep {plan.ep}" if plan.ep > 1 else "")
        + f" = {plan.gpus or cluster.world} GPUs; sequence parallel "
        f"{'on' if plan.sp else 'off'}; ZeRO-{plan.zero_stage}"
        + (" (FSDP)" if plan.fsdp else "")
        + f"; micro-batch {plan.micro_batch} x {plan.grad_accum}; recompute {plan.recompute}; "
        f"offload {plan.offload}",
        f"  {plan.summary()}",
    ]
    why = []
    if plan.tp > 1:
        why.append(f"tensor parallel {plan.tp}: {model.heads // plan.tp} heads and "
                   f"{model.kv_heads // plan.tp} kv heads per GPU, its 4 all-reduces per "
                   f"layer {'on NVLink' if plan.tp <= gpn else 'across nodes'}; sequence "
                   "parallel shards the norms' activations too")
    else:
        why.append("no tensor parallelism: the layers fit whole on a GPU, so no per-layer "
                   "all-reduces")
    if plan.pp > 1:
        sched = ("1F1B" if plan.virtual_stages == 1 else
                 f"interleaved 1F1B, {plan.virtual_stages} chunks per stage")
        why.append(f"pipeline {plan.pp} stages of {layers} layers ({sched}): splits the "
                   f"weights {plan.pp} ways at the cost of a "
                   f"{100 * bubble_fraction(plan.pp, plan.grad_accum, plan.virtual_stages):.1f}"
                   f"% bubble with {plan.grad_accum} micro-batches")
    if plan.cp > 1:
        why.append(f"context parallel {plan.cp}: {training.seq_len // plan.cp} tokens of each "
                   "sequence per GPU (ring attention)")
    if plan.ep > 1:
        why.append(f"expert parallel {plan.ep}: {model.experts // plan.ep} experts per GPU")
    why.append(f"data parallel {plan.dp}: {training.global_batch // plan.dp} sequences per "
               f"replica as {plan.grad_accum} micro-batches of {plan.micro_batch}")
    zero_text = {0: "no ZeRO: every replica keeps full optimizer state",
                 1: "ZeRO-1: optimizer state sharded over the data-parallel ranks",
                 2: "ZeRO-2: optimizer state and gradients sharded",
                 3: "ZeRO-3 / FSDP: weights, gradients and optimizer state sharded"}
    why.append(zero_text[plan.zero_stage] if plan.dp * plan.cp > 1 or plan.zero_stage
               else "no ZeRO: a single replica has nothing to shard")
    why.append({"none": "no recomputation" + (" (flash attention keeps no scores)"
                                               if training.flash_attention else ""),
                "selective": "selective recomputation: attention scores recomputed",
                "full": "full recomputation: each layer's input kept, the rest recomputed"}
               [plan.recompute])
    if plan.offload != "none":
        why.append(f"offload {plan.offload} to CPU memory: it does not fit otherwise")
    # Counterfactuals: what the neighbouring layouts would need.
    base = {k: getattr(plan, k) for k in ("tp", "pp", "cp", "dp", "ep", "micro_batch",
                                          "grad_accum", "virtual_stages", "zero_stage",
                                          "recompute", "offload")}
    alternatives = []
    if plan.recompute != "none":
        alternatives.append(("no recomputation", {"recompute": "none"}))
    if plan.zero_stage > 0:
        alternatives.append((f"ZeRO-{plan.zero_stage - 1}",
                             {"zero_stage": plan.zero_stage - 1}))
    if plan.pp > 1 and plan.pp % 2 == 0:
        alternatives.append((f"pp {plan.pp // 2} (dp {plan.dp * 2})",
                             {"pp": plan.pp // 2, "dp": plan.dp * 2,
                              "grad_accum": max(1, plan.grad_accum // 2),
                              "virtual_stages": 1}))
    if plan.tp > 1 and plan.tp % 2 == 0:
        alternatives.append((f"tp {plan.tp // 2} (dp {plan.dp * 2})",
                             {"tp": plan.tp // 2, "dp": plan.dp * 2,
                              "grad_accum": max(1, plan.grad_accum // 2)}))
    for label, change in alternatives:
        layout = {**base, **change}
        mem = plan_memory(model, training.seq_len, training.precision, training.optimizer,
                          flash=training.flash_attention, **layout)
        if mem.total > cluster.gpu.memory_bytes:
            why.append(f"{label} would need {mem.total / GIB:.1f} GiB of {cap:.0f}: does not "
                       "fit")
        else:
            _, tps, _ = plan_time(model, cluster, training.seq_len, training.global_batch,
                                  training.precision, training.optimizer, **layout)
            why.append(f"{label} would fit ({mem.total / GIB:.1f} GiB) at {tps:,.0f} "
                       f"tokens/s ({100 * (tps / plan.tokens_per_s - 1):+.1f}%)")
    lines.append("Why:")
    lines += [f"  - {w}" for w in why]
    inflight = gib["pipeline_inflight"] / gib["activations"] if gib["activations"] else 0
    lines += [
        "",
        f"Memory per GPU (worst stage): {gib['total']:.1f} of {cap:.0f} GiB "
        f"({'fits' if plan.fits else 'does NOT fit'})",
        f"  weights {gib['params']:.2f}, gradients {gib['grads']:.2f}, optimizer "
        f"{gib['optimizer']:.2f} GiB",
        f"  activations {gib['activations']:.2f} GiB per micro-batch, pipeline in flight "
        f"{gib['pipeline_inflight']:.2f} GiB ({inflight:.1f} more micro-batches)",
        f"  temporary {gib['temporary']:.2f}, reserve {gib['reserve']:.2f} GiB",
        "",
    ]
    t = plan.time
    lines += [
        f"Step time {t.total_s:.3f} s = compute {t.compute_s:.3f} + exposed communication "
        f"{t.comm_exposed_s:.3f} + pipeline bubble {t.bubble_s:.3f} "
        f"({100 * t.bubble_fraction:.1f}% of the step)",
        f"  communication before overlap: data parallel {t.dp_comm_s:.3f} s, tensor "
        f"parallel {t.tp_comm_s:.3f} s, pipeline {t.pp_comm_s:.3f} s, context parallel "
        f"{t.cp_comm_s:.3f} s, expert parallel {t.ep_comm_s:.3f} s"
        + (f", offload {t.offload_s:.3f} s" if t.offload_s else ""),
        f"Throughput {plan.tokens_per_s:,.0f} tokens/s "
        f"({plan.tokens_per_s / (plan.gpus or cluster.world):,.0f} per GPU), MFU "
        f"{100 * plan.mfu:.1f}% (model FLOPs incl. attention, no recomputation)",
    ]
    return "\n".join(lines)


# -- latency ----------------------------------------------------------------------------------
def search_latency_ms(repeats: int = 50, model: str = "llama3-70b",
                      cluster: str = "128x8xH100", global_batch: int = 1024,
                      seq_len: int = 8192, objective: str = "throughput") -> dict[str, float]:
    """Wall time of `search` in this process: {"p50", "p99", "max", "repeats",
    "candidates"} in milliseconds (one warm-up call first)."""
    shape = build_model(model)
    where = parse_cluster(cluster)
    training = build_training(global_batch, seq_len)
    result = search(shape, where, training, objective)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        search(shape, where, training, objective)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    p99 = samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)]
    return {"p50": statistics.median(samples), "p99": p99, "max": samples[-1],
            "repeats": repeats, "candidates": result.evaluated}
