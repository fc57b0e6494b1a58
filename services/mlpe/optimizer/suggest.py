"""What would make a request fit when no layout does (or only with offload): more nodes,
what full recomputation, a smaller micro-batch or offload would save on the closest miss,
a GPU with more memory. Each answer searches again, on the changed cluster."""

from __future__ import annotations

import dataclasses

from mlpe.optimizer.hardware import GPUS, HOST_USABLE, Cluster
from mlpe.optimizer.memory import GIB, plan_memory
from mlpe.optimizer.models import ModelShape
from mlpe.optimizer.search import Plan, Rejection, Training, fastest_fit


def no_layout(cluster: Cluster, rejected: list[Rejection]) -> str:
    """Why nothing could even be evaluated: every layout was rejected before memory."""
    reasons = sorted({r.reason for r in rejected})
    return (f"no layout of {cluster.world} GPUs is possible ("
            f"{'; '.join(reasons[:3]) or 'no candidates'}): change the GPU count or the "
            "global batch")


def what_would_fit(model: ModelShape, cluster: Cluster, training: Training,
                   closest: Plan | None, plans: list[Plan]) -> list[str]:
    """Suggestions when nothing fits (`closest` is then the smallest overflow) or the
    plans need offload."""
    out = [more_nodes(model, cluster, training)]
    if closest is not None:
        out.insert(0, f"closest plan: {closest.summary()} (over by "
                      f"{closest.overflow_bytes / GIB:.1f} GiB)")
        out += savings(model, cluster, training, closest)
    elif plans and plans[0].offload != "none":
        out.insert(0, "fits only with offload to CPU memory (slow)")
    bigger = bigger_gpu(model, cluster, training)
    return out + ([bigger] if bigger else [])


def more_nodes(model: ModelShape, cluster: Cluster, training: Training) -> str:
    """The fewest nodes of the same kind on which a plan fits without offload."""
    # Double until a plan fits, then bisect back.
    hi, found = cluster.nodes, None
    for _ in range(16):
        hi *= 2
        found = fastest_fit(model, dataclasses.replace(cluster, nodes=hi), training)
        if found:
            break
    if not found:
        return (f"no cluster of up to {cluster.nodes * 2**16} nodes fits it without "
                "offload: shorten the sequence or the global batch")
    lo = max(cluster.nodes, hi // 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        plan = fastest_fit(model, dataclasses.replace(cluster, nodes=mid), training)
        if plan:
            hi, found = mid, plan
        else:
            lo = mid
    return (f"use at least {hi} nodes ({hi * cluster.gpus_per_node} GPUs) of "
            f"{cluster.gpus_per_node}x{cluster.gpu.name} instead of {cluster.nodes}: "
            f"{found.summary()}")


def savings(model: ModelShape, cluster: Cluster, training: Training,
            closest: Plan) -> list[str]:
    """What each memory-saving change to the closest miss saves, and whether it fits."""
    over = closest.overflow_bytes

    def memory(**change):
        return plan_memory(model, training.seq_len, training.precision, training.optimizer,
                           closest.replace(**change), flash=training.flash_attention)

    def verdict(saved):
        return "enough to fit" if saved >= over else \
            f"still {(over - saved) / GIB:.1f} GiB short"

    out = []
    if closest.recompute != "full":
        s = closest.memory.total - memory(recompute="full").total
        out.append(f"full recomputation saves {s / GIB:.1f} GiB per GPU: {verdict(s)}")
    if closest.micro_batch > 1:
        s = closest.memory.total - memory(
            micro_batch=1, grad_accum=closest.grad_accum * closest.micro_batch).total
        out.append(f"micro-batch 1 instead of {closest.micro_batch} saves "
                   f"{s / GIB:.1f} GiB: {verdict(s)}")
    host = cluster.host_memory_gib
    for what, change in (("optimizer offload to CPU memory",
                          {"offload": "optimizer", "zero_stage": max(1, closest.zero_stage)}),
                         ("weight and optimizer offload (ZeRO-Infinity)",
                          {"offload": "params", "zero_stage": 3})):
        mem = memory(**change)
        s = closest.memory.total - mem.total
        need = mem.host_offload * cluster.gpus_per_node / GIB
        room = ("" if need <= host * HOST_USABLE else
                f", but needs {need:,.0f} GiB of CPU memory per node (has {host:,.0f})")
        out.append(f"{what} saves {s / GIB:.1f} GiB per GPU: {verdict(s)}{room}")
    return out


def bigger_gpu(model: ModelShape, cluster: Cluster, training: Training) -> str | None:
    """The first GPU with more memory on which the same nodes fit it, if any."""
    for gpu in GPUS.values():
        if gpu.memory_gib > cluster.gpu.memory_gib and (
                training.precision != "fp8" or gpu.fp8_tflops):
            bigger = dataclasses.replace(cluster, gpu=gpu, intra_gbps=0.0, inter_gbps=0.0)
            plan = fastest_fit(model, bigger, training)
            if plan:
                return (f"on {cluster.nodes}x{cluster.gpus_per_node} {gpu.name} "
                        f"({gpu.memory_gib:.0f} GiB) it fits: {plan.summary()}")
    return None
