"""A layout the user already runs (`mlpe plan --layout tp8,pp16,dp128,zero1,mb1`,
PlanRequest.layout): parsed, checked against the model, the cluster and the batch, and
evaluated with the formulas the search uses. When it cannot run, the answer is every
reason (divisibility, memory by how much) and the nearest layouts that do.

The form: comma-separated parts, in any order, each at most once —
  tpN ppN dpN cpN epN   parallel sizes (1 when left out; dp: the GPUs left over)
  vppN                  interleaved pipeline chunks per stage (1: plain 1F1B)
  schedule=1f1b|interleaved   optional; must agree with vpp
  zeroN or fsdp         ZeRO stage 0-3 (fsdp = 3); 0 when left out
  mbN gaN               micro-batch (sequences) and micro-batches per step; the one left
                        out follows from the global batch (mb 1 when both are)
  sp                    sequence parallelism: always on with tp > 1 in this model
  recompute=none|selective|full   offload=none|optimizer|params
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.hardware import Cluster
from mlpe.optimizer.layout import NAMES, Layout
from mlpe.optimizer.memory import GIB, breakdown, memory_arrays
from mlpe.optimizer.models import ModelShape
from mlpe.optimizer.search import MAX_PP_IMBALANCE, Plan, Training, rank_layouts
from mlpe.optimizer.timing import CONSTANTS, Constants, step_time, time_arrays

FORM = ("comma-separated parts like tp8,pp16,dp128,vpp2,cp2,ep4,zero1 (or fsdp),mb1,ga16,"
        "sp,recompute=selective,offload=optimizer")
SIZES = {"tp": "tp", "pp": "pp", "dp": "dp", "cp": "cp", "ep": "ep", "vpp": "virtual_stages",
         "zero": "zero_stage", "mb": "micro_batch", "ga": "grad_accum"}
CHOICES = {**NAMES, "schedule": ("1f1b", "interleaved")}
MAX_SIZE = 1 << 20
NEAREST = 3
_SIZE = re.compile(r"^([a-z]+)=?(\d+)$")
_CHOICE = re.compile(r"^([a-z]+)=([a-z0-9]+)$")


def parse_layout(text: str) -> dict:
    """The parts of a layout string by Layout field name (plus "sp" and "schedule" when
    given); a bad string raises PlanInputError("layout", …) naming the part."""
    if not isinstance(text, str) or not text.strip():
        raise PlanInputError("layout", f"empty: expected {FORM}")
    if len(text) > 500:
        raise PlanInputError("layout", f"{len(text)} characters: at most 500")
    parts: dict = {}
    for raw in text.split(","):
        part = raw.strip().lower()
        if not part:
            raise PlanInputError("layout", f"an empty part in {text!r} (two commas?)")
        if part in ("sp", "fsdp"):
            key, value = ("sp", True) if part == "sp" else ("zero_stage", 3)
        elif (size := _SIZE.match(part)) and size.group(1) in SIZES:
            key, value = SIZES[size.group(1)], int(size.group(2))
            if not 0 <= value <= MAX_SIZE:
                raise PlanInputError("layout", f"part {raw.strip()!r}: {value} is too large")
        elif (choice := _CHOICE.match(part)) and choice.group(1) in CHOICES:
            key, value = choice.groups()
            if value not in CHOICES[key]:
                raise PlanInputError("layout", f"part {raw.strip()!r}: {key} must be one of "
                                     f"{', '.join(CHOICES[key])}")
        else:
            raise PlanInputError("layout", f"part {raw.strip()!r} is not understood: "
                                 f"expected {FORM}")
        if key in parts:
            raise PlanInputError("layout", f"part {raw.strip()!r}: {key} is given twice")
        if key in ("tp", "pp", "dp", "cp", "ep", "virtual_stages", "micro_batch",
                   "grad_accum") and value < 1:
            raise PlanInputError("layout", f"part {raw.strip()!r}: must be ≥ 1")
        if key == "zero_stage" and value > 3:
            raise PlanInputError("layout", f"part {raw.strip()!r}: ZeRO stages are 0-3")
        parts[key] = value
    return parts


@dataclasses.dataclass
class Verdict:
    """What a fixed layout would do: `plan` (None when its sizes do not make a layout of
    this cluster and batch), `problems` (empty when it runs) and, when it does not, the
    `nearest` fitting layouts, closest first (none when nothing fits at all)."""
    plan: Plan | None
    problems: list[str]
    nearest: list[Plan] = dataclasses.field(default_factory=list)
    evaluated: int = 1

    @property
    def runs(self) -> bool:
        return self.plan is not None and not self.problems


def _complete(model: ModelShape, cluster: Cluster, training: Training,
              parts: dict) -> tuple[Layout | None, list[str]]:
    """The full Layout the parts describe on this cluster and batch, and every reason it
    cannot run before memory is counted."""
    get = parts.get
    tp, pp, cp, ep, v = (get(k, 1) for k in ("tp", "pp", "cp", "ep", "virtual_stages"))
    world, problems = cluster.world, []
    inner = tp * pp * cp
    dp = get("dp")
    if dp is None:
        if world % inner:
            return None, [f"tp{tp} x pp{pp} x cp{cp} = {inner} GPUs does not divide the "
                          f"cluster's {world}"]
        dp = world // inner
    elif inner * dp != world:
        return None, [f"tp{tp} x pp{pp} x cp{cp} x dp{dp} = {inner * dp} GPUs; the cluster "
                      f"({cluster}) has {world}"]
    gb = training.global_batch
    mb, ga = get("micro_batch"), get("grad_accum")
    if gb % dp:
        return None, [f"global batch {gb} not divisible by dp {dp}"]
    local = gb // dp
    if mb is not None and ga is not None and mb * ga != local:
        return None, [f"mb{mb} x ga{ga} x dp{dp} = {mb * ga * dp} sequences; the global "
                      f"batch is {gb}"]
    if mb is None and ga is None:
        mb = 1
    if ga is None:
        if local % mb:
            return None, [f"micro-batch {mb} does not divide the {local} sequences per "
                          f"data-parallel replica (global batch {gb} / dp {dp})"]
        ga = local // mb
    elif mb is None:
        if local % ga:
            return None, [f"{ga} micro-batches do not divide the {local} sequences per "
                          f"data-parallel replica (global batch {gb} / dp {dp})"]
        mb = local // ga
    for name, value in (("heads", model.heads), ("kv_heads", model.kv_heads),
                        ("ffn", model.ffn)):
        if value % tp:
            problems.append(f"{name} {value} not divisible by tp {tp}")
    if get("sp") and tp == 1:
        problems.append("sp (sequence parallelism) needs tp > 1")
    if pp > model.layers:
        problems.append(f"pp {pp} is more stages than the model's {model.layers} layers")
    elif math.ceil(model.layers / pp) * pp / model.layers > MAX_PP_IMBALANCE:
        problems.append(f"layers {model.layers} not divisible by pp {pp} (stages of "
                        f"{math.ceil(model.layers / pp)} layers: over "
                        f"{100 * (MAX_PP_IMBALANCE - 1):.0f}% imbalance)")
    schedule = get("schedule")
    if schedule == "interleaved" and v == 1:
        problems.append("schedule=interleaved needs vppN with N > 1 chunks per stage")
    if schedule == "1f1b" and v > 1:
        problems.append(f"schedule=1f1b and vpp{v} disagree (vpp > 1 is the interleaved "
                        "schedule)")
    if v > 1:
        if pp == 1:
            problems.append(f"vpp{v} (interleaved chunks) needs pp > 1")
        elif math.ceil(model.layers / (pp * v)) * pp * v / model.layers > MAX_PP_IMBALANCE:
            # As for stages: Llama 3 405B ran 126 layers in 16 stages x chunks, the first
            # and the last one layer short.
            problems.append(f"layers {model.layers} not divisible by pp {pp} x vpp {v} "
                            f"(chunks of {math.ceil(model.layers / (pp * v))} layers: "
                            f"over {100 * (MAX_PP_IMBALANCE - 1):.0f}% imbalance)")
        if ga % pp:
            problems.append(f"the interleaved schedule needs the micro-batches ({ga}) to be "
                            f"a multiple of pp {pp}")
    if cp > 1 and training.seq_len % (2 * cp):
        problems.append(f"sequence length {training.seq_len} not divisible by 2 x cp {cp} "
                        "(ring attention splits each sequence in 2 cp chunks)")
    if ep > 1:
        if not model.moe:
            problems.append(f"ep {ep} needs a mixture-of-experts model")
        elif model.experts % ep:
            problems.append(f"experts {model.experts} not divisible by ep {ep}")
        if dp % ep:
            problems.append(f"ep {ep} does not divide dp {dp} (experts are split over the "
                            "data-parallel group)")
    zero = get("zero_stage", 0)
    offload = get("offload", "none")
    if offload == "optimizer" and zero == 0:
        problems.append("offload=optimizer needs ZeRO ≥ 1")
    if offload == "params" and zero != 3:
        problems.append("offload=params needs ZeRO-3 (fsdp)")
    layout = Layout(tp=tp, pp=pp, virtual_stages=v, cp=cp, dp=dp, ep=ep, micro_batch=mb,
                    grad_accum=ga, zero_stage=zero, recompute=get("recompute", "none"),
                    offload=offload)
    return layout, problems


def evaluate(model: ModelShape, cluster: Cluster, training: Training, parts: dict,
             k: Constants = CONSTANTS, nearest: bool = True) -> Verdict:
    """The fixed layout `parts` (parse_layout's) of `model` on `cluster`: its plan and
    every reason it cannot run, with (unless not `nearest`) the nearest layouts that
    can. `k`: the step-time model's constants (timing.py)."""
    layout, problems = _complete(model, cluster, training, parts)
    plan = None
    if layout is not None:  # figures even when it cannot run: what it would need
        one = Layout(**{k: np.asarray([v]) if k not in NAMES else v
                        for k, v in layout.values().items()})
        mem = memory_arrays(model, training.seq_len, training.precision, training.optimizer,
                            one, flash=training.flash_attention)
        times = time_arrays(model, cluster, training.seq_len, training.global_batch,
                            training.precision, training.optimizer, one, k)
        capacity = float(cluster.gpu.memory_bytes)
        total, host = float(mem["total"][0]), float(mem["host_offload"][0])
        fits = total <= capacity and host <= cluster.host_bytes_per_gpu
        plan = Plan(**layout.values(), memory=breakdown(mem, 0), time=step_time(times, 0),
                    tokens_per_s=float(times["tokens_per_s"][0]), mfu=float(times["mfu"][0]),
                    fits=fits, capacity_bytes=capacity)
        if total > capacity:
            problems.append(f"out of memory by {(total - capacity) / GIB:.1f} GiB per GPU "
                            f"(needs {total / GIB:.1f} of {capacity / GIB:.0f})")
        if host > cluster.host_bytes_per_gpu:
            problems.append(f"offload needs {host / GIB:.0f} GiB of host memory per GPU, "
                            f"{cluster.host_bytes_per_gpu / GIB:.0f} are usable")
    verdict = Verdict(plan, problems)
    if problems and nearest:
        found = rank_layouts(model, cluster, training, "throughput", top_k=1000)
        verdict.evaluated += found.evaluated
        wanted = layout if layout is not None else Layout(
            **{k: v for k, v in parts.items() if k in Layout.__dataclass_fields__})
        verdict.nearest = sorted(found.plans, key=lambda p: (distance(wanted, p),
                                                             -p.tokens_per_s))[:NEAREST]
    return verdict


def distance(a: Layout, b: Layout) -> float:
    """How far apart two layouts are: octaves of each size, half a step per ZeRO stage,
    one per other choice changed."""
    sizes = ("tp", "pp", "virtual_stages", "cp", "dp", "ep", "micro_batch")
    return (sum(abs(math.log2(getattr(a, s) / getattr(b, s))) for s in sizes)
            + 0.5 * abs(a.zero_stage - b.zero_stage)
            + (a.recompute != b.recompute) + (a.offload != b.offload))
