"""A plan in prose: its layout and why, what the neighbouring layouts would need, memory
per GPU and step time (`mlpe plan --explain`, the ExplainPlan call)."""

from __future__ import annotations

import math

from mlpe.optimizer.hardware import Cluster
from mlpe.optimizer.memory import GIB, plan_memory
from mlpe.optimizer.models import ModelShape
from mlpe.optimizer.search import Plan, Training
from mlpe.optimizer.timing import bubble_fraction, plan_time

ZERO_TEXT = {0: "no ZeRO: every replica keeps full optimizer state",
             1: "ZeRO-1: optimizer state sharded over the data-parallel ranks",
             2: "ZeRO-2: optimizer state and gradients sharded",
             3: "ZeRO-3 / FSDP: weights, gradients and optimizer state sharded"}


def explain(plan: Plan, model: ModelShape, cluster: Cluster, training: Training) -> str:
    """A readable account of a plan: the layout and why, memory per GPU, step time."""
    lines = [
        f"{model.describe()}",
        f"on {plan.gpus} x {cluster.gpu.name} ({cluster}), global batch "
        f"{training.global_batch} x {training.seq_len} tokens, {training.precision}, "
        f"{training.optimizer}",
        "",
        describe_layout(plan),
        f"  {plan.summary()}",
        "Why:",
    ]
    why = reasons(plan, model, cluster, training) + alternatives(plan, model, cluster,
                                                                  training)
    lines += [f"  - {w}" for w in why]
    lines += ["", *memory_lines(plan, cluster), "", *time_lines(plan)]
    return "\n".join(lines)


def describe_layout(plan: Plan) -> str:
    """Every field of the layout, in one line."""
    return (f"Layout: tp {plan.tp} x pp {plan.pp}"
            + (f" ({plan.virtual_stages} interleaved chunks)" if plan.virtual_stages > 1
               else "")
            + f" x cp {plan.cp} x dp {plan.dp}" + (f", ep {plan.ep}" if plan.ep > 1 else "")
            + f" = {plan.gpus} GPUs; sequence parallel {'on' if plan.sp else 'off'}; "
            f"ZeRO-{plan.zero_stage}" + (" (FSDP)" if plan.fsdp else "")
            + f"; micro-batch {plan.micro_batch} x {plan.grad_accum}; recompute "
            f"{plan.recompute}; offload {plan.offload}")


def reasons(plan: Plan, model: ModelShape, cluster: Cluster, training: Training) -> list[str]:
    """What each choice of the layout does."""
    why = []
    if plan.tp > 1:
        why.append(f"tensor parallel {plan.tp}: {model.heads // plan.tp} heads and "
                   f"{model.kv_heads // plan.tp} kv heads per GPU, its 4 all-reduces per "
                   f"layer {'on NVLink' if plan.tp <= cluster.gpus_per_node else 'across nodes'}"
                   "; sequence parallel shards the norms' activations too")
    else:
        why.append("no tensor parallelism: the layers fit whole on a GPU, so no per-layer "
                   "all-reduces")
    if plan.pp > 1:
        sched = ("1F1B" if plan.virtual_stages == 1 else
                 f"interleaved 1F1B, {plan.virtual_stages} chunks per stage")
        bubble = bubble_fraction(plan.pp, plan.grad_accum, plan.virtual_stages)
        why.append(f"pipeline {plan.pp} stages of {math.ceil(model.layers / plan.pp)} layers "
                   f"({sched}): splits the weights {plan.pp} ways at the cost of a "
                   f"{100 * bubble:.1f}% bubble with {plan.grad_accum} micro-batches")
    if plan.cp > 1:
        why.append(f"context parallel {plan.cp}: {training.seq_len // plan.cp} tokens of each "
                   "sequence per GPU (ring attention)")
    if plan.ep > 1:
        why.append(f"expert parallel {plan.ep}: {model.experts // plan.ep} experts per GPU")
    why.append(f"data parallel {plan.dp}: {training.global_batch // plan.dp} sequences per "
               f"replica as {plan.grad_accum} micro-batches of {plan.micro_batch}")
    why.append(ZERO_TEXT[plan.zero_stage] if plan.dp * plan.cp > 1 or plan.zero_stage
               else "no ZeRO: a single replica has nothing to shard")
    why.append({"none": "no recomputation" + (" (flash attention keeps no scores)"
                                               if training.flash_attention else ""),
                "selective": "selective recomputation: attention scores recomputed",
                "full": "full recomputation: each layer's input kept, the rest recomputed"}
               [plan.recompute])
    if plan.offload != "none":
        why.append(f"offload {plan.offload} to CPU memory: it does not fit otherwise")
    return why


def alternatives(plan: Plan, model: ModelShape, cluster: Cluster,
                 training: Training) -> list[str]:
    """What the neighbouring layouts would need: memory, and speed if they fit."""
    changes = []
    if plan.recompute != "none":
        changes.append(("no recomputation", {"recompute": "none"}))
    if plan.zero_stage > 0:
        changes.append((f"ZeRO-{plan.zero_stage - 1}", {"zero_stage": plan.zero_stage - 1}))
    if plan.pp > 1 and plan.pp % 2 == 0:
        changes.append((f"pp {plan.pp // 2} (dp {plan.dp * 2})",
                        {"pp": plan.pp // 2, "dp": plan.dp * 2,
                         "grad_accum": max(1, plan.grad_accum // 2), "virtual_stages": 1}))
    if plan.tp > 1 and plan.tp % 2 == 0:
        changes.append((f"tp {plan.tp // 2} (dp {plan.dp * 2})",
                        {"tp": plan.tp // 2, "dp": plan.dp * 2,
                         "grad_accum": max(1, plan.grad_accum // 2)}))
    out = []
    for label, change in changes:
        layout = plan.replace(**change)
        mem = plan_memory(model, training.seq_len, training.precision, training.optimizer,
                          layout, flash=training.flash_attention)
        if mem.total > cluster.gpu.memory_bytes:
            out.append(f"{label} would need {mem.total / GIB:.1f} GiB of "
                       f"{cluster.gpu.memory_gib:.0f}: does not fit")
        else:
            _, tps, _ = plan_time(model, cluster, training.seq_len, training.global_batch,
                                  training.precision, training.optimizer, layout)
            out.append(f"{label} would fit ({mem.total / GIB:.1f} GiB) at {tps:,.0f} "
                       f"tokens/s ({100 * (tps / plan.tokens_per_s - 1):+.1f}%)")
    return out


def memory_lines(plan: Plan, cluster: Cluster) -> list[str]:
    gib = plan.memory.gib()
    inflight = gib["pipeline_inflight"] / gib["activations"] if gib["activations"] else 0
    return [
        f"Memory per GPU (worst stage): {gib['total']:.1f} of {cluster.gpu.memory_gib:.0f} "
        f"GiB ({'fits' if plan.fits else 'does NOT fit'})",
        f"  weights {gib['params']:.2f}, gradients {gib['grads']:.2f}, optimizer "
        f"{gib['optimizer']:.2f} GiB",
        f"  activations {gib['activations']:.2f} GiB per micro-batch, pipeline in flight "
        f"{gib['pipeline_inflight']:.2f} GiB ({inflight:.1f} more micro-batches)",
        f"  temporary {gib['temporary']:.2f}, reserve {gib['reserve']:.2f} GiB",
    ]


def time_lines(plan: Plan) -> list[str]:
    t = plan.time
    return [
        f"Step time {t.total_s:.3f} s = compute {t.compute_s:.3f} + exposed communication "
        f"{t.comm_exposed_s:.3f} + pipeline bubble {t.bubble_s:.3f} "
        f"({100 * t.bubble_fraction:.1f}% of the step)",
        f"  communication before overlap: data parallel {t.dp_comm_s:.3f} s, tensor "
        f"parallel {t.tp_comm_s:.3f} s, pipeline {t.pp_comm_s:.3f} s, context parallel "
        f"{t.cp_comm_s:.3f} s, expert parallel {t.ep_comm_s:.3f} s"
        + (f", offload {t.offload_s:.3f} s" if t.offload_s else ""),
        f"Throughput {plan.tokens_per_s:,.0f} tokens/s "
        f"({plan.tokens_per_s / plan.gpus:,.0f} per GPU), MFU "
        f"{100 * plan.mfu:.1f}% (model FLOPs incl. attention, no recomputation)",
    ]
