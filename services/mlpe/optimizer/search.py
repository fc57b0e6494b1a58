"""Layout search: every layout (layout.py) of a model on a cluster, evaluated and ranked.

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
- ZeRO stage 0-3, recomputation none / selective / full; offload only when nothing fits
  without.
All candidates of a GPU count are one Layout of numpy arrays, evaluated at once by
memory.memory_arrays and timing.time_arrays (the formulas of the single-layout functions),
so a search of ~10^4 candidates takes a few milliseconds; Plan objects are built only for
the ranked top_k and the closest miss.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.hardware import Cluster
from mlpe.optimizer.layout import RECOMPUTE, Layout
from mlpe.optimizer.memory import (
    GIB,
    OPTIMIZERS,
    PRECISIONS,
    RESERVE_BYTES,
    MemoryBreakdown,
    breakdown,
    memory_arrays,
    state_bytes_per_param,
)
from mlpe.optimizer.models import ModelShape
from mlpe.optimizer.timing import StepTime, step_time, time_arrays

OBJECTIVES = ("throughput", "fewest_gpus", "fit", "cheapest")
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan(Layout):
    """A layout with what the models predict for it."""
    memory: MemoryBreakdown
    time: StepTime
    tokens_per_s: float
    mfu: float
    fits: bool
    capacity_bytes: float = 0.0  # the GPU's memory

    @property
    def overflow_bytes(self) -> float:
        return self.memory.total - self.capacity_bytes

    def summary(self) -> str:
        pp = f"pp{self.pp}" + (f"x{self.virtual_stages}v" if self.virtual_stages > 1 else "")
        extra = "" if self.offload == "none" else f" offload={self.offload}"
        return (f"tp{self.tp} {pp} cp{self.cp}{f' ep{self.ep}' if self.ep > 1 else ''} "
                f"dp{self.dp} zero{self.zero_stage} mb{self.micro_batch}x{self.grad_accum} "
                f"recompute={self.recompute}{extra}: {self.memory.total / GIB:.1f} GiB, "
                f"{self.tokens_per_s:,.0f} tokens/s, MFU {100 * self.mfu:.1f}%")


@dataclasses.dataclass
class Rejection:
    layout: dict  # the sizes that decided it, e.g. {"tp": 3}
    reason: str


@dataclasses.dataclass
class SearchResult:
    plans: list[Plan]  # fitting plans, best first by the objective
    rejected: list[Rejection]
    closest: Plan | None  # when nothing fits: the smallest memory overflow
    suggestions: list[str] = dataclasses.field(default_factory=list)  # by planner.search
    evaluated: int = 0  # candidates evaluated
    elapsed_ms: float = 0.0


# -- enumeration ------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclasses.dataclass
class _Candidates:
    """Every candidate of one world size."""
    world: int
    layouts: Layout  # of numpy arrays
    group_starts: np.ndarray  # candidates of one group are contiguous
    groups: list[dict]  # the parallel sizes: tp, pp, cp, ep, virtual_stages, dp
    rejected: list[Rejection]

    @property
    def size(self) -> int:
        return len(self.layouts.tp)


def _enumerate(model: ModelShape, training: Training, world: int, gpus_per_node: int,
               offload: tuple[int, ...]) -> _Candidates:
    rejected: list[Rejection] = []
    groups: list[dict] = []
    micro_batches: list[list[int]] = []  # each group's
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
                            groups.append({"tp": tp, "pp": pp, "cp": cp, "ep": ep,
                                           "virtual_stages": v, "dp": dp})
                            micro_batches.append(ok)
    # Candidates: group x micro-batch x ZeRO stage x recompute x offload, by group.
    per_mb = [(g, b) for g, mbs in enumerate(micro_batches) for b in mbs]
    combos = [(z, r, o) for o in offload for z in ZERO_STAGES for r in range(len(RECOMPUTE))
              if not (o == 1 and z == 0) and not (o == 2 and z != 3)]
    if not per_mb:
        empty = Layout(**{f.name: np.zeros(0) for f in dataclasses.fields(Layout)})
        return _Candidates(world, empty, np.zeros(0, dtype=int), groups, rejected)
    group_of = np.repeat(np.array([g for g, _ in per_mb]), len(combos))
    mb = np.repeat(np.array([b for _, b in per_mb], dtype=float), len(combos))
    combo = np.tile(np.array(combos), (len(per_mb), 1))
    sizes = {name: np.array([g[name] for g in groups], dtype=float)[group_of]
             for name in groups[0]}
    layouts = Layout(**sizes, micro_batch=mb,
                     grad_accum=training.global_batch / sizes["dp"] / mb,
                     zero_stage=combo[:, 0], recompute=combo[:, 1], offload=combo[:, 2])
    # Without data (or context) parallel ranks there is nothing to shard: ZeRO 1-3 are
    # ZeRO 0 (offload still needs its stage).
    keep = ~((layouts.dp * layouts.cp == 1) & (layouts.zero_stage > 0)
             & (layouts.offload == 0))
    if not keep.all():
        layouts, group_of = layouts.select(keep), group_of[keep]
    starts = np.flatnonzero(np.r_[True, group_of[1:] != group_of[:-1]])
    return _Candidates(world, layouts, starts, groups, rejected)


# -- evaluation and ranking -------------------------------------------------------------------
def _evaluate(model: ModelShape, cluster: Cluster, training: Training,
              cands: _Candidates) -> dict:
    mem = memory_arrays(model, training.seq_len, training.precision, training.optimizer,
                        cands.layouts, flash=training.flash_attention)
    fits = ((mem["total"] <= cluster.gpu.memory_bytes)
            & (mem["host_offload"] <= cluster.host_bytes_per_gpu))
    times = time_arrays(model, cluster, training.seq_len, training.global_batch,
                        training.precision, training.optimizer, cands.layouts)
    return {"mem": mem, "fits": fits, "time": times}


def _plan(cands: _Candidates, ev: dict, i: int, cluster: Cluster) -> Plan:
    times = ev["time"]
    return Plan(**cands.layouts.one(i).values(), memory=breakdown(ev["mem"], i),
                time=step_time(times, i), tokens_per_s=float(times["tokens_per_s"][i]),
                mfu=float(times["mfu"][i]), fits=bool(ev["fits"][i]),
                capacity_bytes=float(cluster.gpu.memory_bytes))


def _oom_rejections(cands: _Candidates, ev: dict, capacity: float) -> list[Rejection]:
    """One rejection per group none of whose candidates fits, for its smallest need."""
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
    out, seen = [], set()
    for i in _rank(ev, np.flatnonzero(ev["fits"]), objective):
        key = (cands.layouts.one(i).replace(zero_stage=0),
               round(float(ev["time"]["tokens_per_s"][i]), 3))
        if key in seen:
            continue
        seen.add(key)
        out.append(_plan(cands, ev, int(i), cluster))
        if len(out) >= k:
            break
    return out


def _closest(tried: list[tuple[_Candidates, dict]], cluster: Cluster) -> Plan | None:
    """The candidate without offload that overflows GPU memory the least."""
    best = None
    for cands, ev in tried:
        if not cands.size or cands.layouts.offload.max() > 0:
            continue
        i = int(np.argmin(ev["mem"]["total"]))
        if best is None or ev["mem"]["total"][i] < best[1]["mem"]["total"][best[2]]:
            best = (cands, ev, i)
    return None if best is None else _plan(*best, cluster)


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


def _cost_worlds(cluster: Cluster) -> list[int]:
    """GPU counts to try for cheapest: divisors of one node, then whole nodes in powers
    of two and all of them (every world is searched whole: log-spaced keeps it fast)."""
    nodes = sorted({n for n in (2 ** i for i in range(1, cluster.nodes.bit_length()))
                    if n <= cluster.nodes} | {cluster.nodes} - {1})
    return _divisors(cluster.gpus_per_node) + [n * cluster.gpus_per_node for n in nodes]


# -- search -----------------------------------------------------------------------------------
def rank_layouts(model: ModelShape, cluster: Cluster, training: Training,
                 objective: str = "throughput", top_k: int = 10) -> SearchResult:
    """The layouts of `model` on `cluster` for `training`, ranked (planner.search adds
    the suggestions).

    objective "throughput": fitting plans on all the GPUs, most tokens/s first;
    "fewest_gpus": the smallest GPU count (whole nodes, or part of one node) on which
    plans fit, most tokens/s first within it; "fit": fitting plans, least memory first;
    "cheapest": the lowest cost per token on any GPU count of the cluster (_cost_worlds),
    i.e. the most tokens/s per GPU: with one GPU type the price does not reorder them.
    Offload is only tried when nothing fits without. When nothing fits at all, `closest`
    is the candidate with the smallest overflow."""
    if objective not in OBJECTIVES:
        raise PlanInputError("objective", f"must be one of {', '.join(OBJECTIVES)}, got "
                                          f"{objective!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise PlanInputError("top_k", f"must be a whole number ≥ 1, got {top_k!r}")
    if training.precision == "fp8" and not cluster.gpu.fp8_tflops:
        raise PlanInputError("training.precision", f"{cluster.gpu.name} has no fp8 tensor "
                                                   "cores")
    capacity = float(cluster.gpu.memory_bytes)
    worlds = _worlds(cluster) if objective == "fewest_gpus" else \
        _cost_worlds(cluster) if objective == "cheapest" else [cluster.world]
    every_world = objective == "cheapest"  # the best of each, compared after
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
            plans += _top(cands, ev, objective, top_k if every_world else top_k - len(plans),
                          cluster)
            if len(plans) >= top_k and not every_world:
                break
        if plans:
            break
    if objective == "fewest_gpus":
        plans.sort(key=lambda p: (p.gpus, -p.tokens_per_s))
    if objective == "cheapest":  # cost per token = GPUs x price / tokens/s, one GPU type
        plans.sort(key=lambda p: (-p.tokens_per_s / p.gpus, p.gpus))
    # Nothing fits: the rejections and the closest miss are those of all the GPUs without
    # offload, which fewest_gpus may have skipped.
    if not plans and not any(c.world == cluster.world and not c.layouts.offload.any()
                             for c, _ in tried):
        cands = _enumerate(model, training, cluster.world, cluster.gpus_per_node, (0,))
        ev = _evaluate(model, cluster, training, cands)
        evaluated += cands.size
        tried.append((cands, ev))
        rejected = cands.rejected + _oom_rejections(cands, ev, capacity)
    closest = None if plans else _closest(tried, cluster)
    return SearchResult(plans[:top_k], rejected, closest, evaluated=evaluated)


def fastest_fit(model: ModelShape, cluster: Cluster, training: Training) -> Plan | None:
    """The fastest plan without offload on all of `cluster`, or None."""
    if _states_lower_bound(model, training, cluster.world) > cluster.gpu.memory_bytes:
        return None
    cands = _enumerate(model, training, cluster.world, cluster.gpus_per_node, (0,))
    ev = _evaluate(model, cluster, training, cands)
    top = _top(cands, ev, "throughput", 1, cluster)
    return top[0] if top else None
