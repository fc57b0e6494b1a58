"""Step time of a training layout: compute, exposed communication, pipeline bubble.

Compute. FLOPs per step = flops_per_token(seq) x global batch x seq (ModelShape: 6 N +
12 L h s, PaLM/Megatron convention) x the recomputation overhead (full: the forward again,
4/3 of everything; selective: the attention core's forward again, 4/3 of the attention
term), spread evenly over the world:
    compute_s = FLOPs / (world x peak x achievable x gemm_efficiency)
peak: bf16 dense; fp32 trains on TF32 tensor cores (half of bf16); fp8 uses the fp8 peak
times fp8_efficiency (fp8 recipes gain ~1.3-1.5x over bf16 end to end, not 2x: casts,
scaling and the bf16 attention). `achievable` is the GPU's calibration constant
(hardware.py) for large matmuls; gemm_efficiency = 1 / (1 + 256 / (hidden / tp) + 256 /
tokens per micro-batch) is a heuristic for the smaller, less efficient GEMMs that wide
tensor parallelism and tiny micro-batches make.

Communication, per GPU, over links running at link_efficiency of their bandwidth (NCCL's
bus bandwidth on NVLink and InfiniBand); a group inside a node uses NVLink, one that spans
nodes the per-GPU network link (ranks are placed tp innermost, then cp, then dp, then pp,
as Megatron-LM does):
- data parallel (group dp x cp), ring algorithms: all-reduce 2 (n-1)/n x bytes / bw,
  reduce-scatter and all-gather (n-1)/n each. ZeRO 0/1: one gradient all-reduce (ZeRO-1:
  reduce-scatter + all-gather of the weights, the same volume) per step, hidden behind the
  last micro-batch's backward; ZeRO 2: a reduce-scatter per micro-batch (gradients
  accumulate in shards) and a weight all-gather per step; ZeRO 3 / FSDP: weight all-gather
  in forward and again in backward plus the gradient reduce-scatter, every micro-batch,
  i.e. 1.5x the all-reduce volume per micro-batch. ZeRO 2/3 traffic overlaps with the whole
  step's compute. Exposed = max(comm x (1 - dp_overlap), comm - dp_overlap x hideable).
- tensor parallel: 4 all-reduces of s x b x h activations per layer and micro-batch
  (2 forward, 2 backward; sequence parallelism replaces each by a reduce-scatter and an
  all-gather of the same volume), 6 with full recomputation; not overlapped.
- context parallel (ring attention): each layer passes K and V around the ring (cp - 1
  steps forward, twice that backward); cp_overlap of it hides behind attention compute.
- expert parallel: 4 all-to-alls of the routed tokens (top_k copies) per MoE layer and
  micro-batch, (ep - 1)/ep of them leaving the GPU; not overlapped.
- pipeline: each micro-batch's activations (s b h / t with SP) go forward and their
  gradients back across each stage boundary, times v chunks for the interleaved schedule.
- offload: optimizer state on the CPU costs a PCIe round trip of gradients and weights and
  a CPU Adam step (CPU_ADAM_PARAMS_PER_S per GPU); offloaded weights are also streamed in
  twice per micro-batch.
Pipeline bubble (1F1B, Narayanan et al. 2021): (p - 1) micro-batch slots of idle time per
step, (p - 1)/v with v interleaved chunks, so the bubble's share of the step is
(p - 1) / (m + p - 1) (resp. (p-1)/v / (m + (p-1)/v)).

MFU = model FLOPs per token (6 N + 12 L h s: attention FLOPs INCLUDED, recomputation
not) x tokens/s / (world x dense peak of the training precision; fp8 runs are measured
against the bf16 peak, as the Llama 3 paper reports them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.hardware import GPU, Cluster
from mlpe.optimizer.layout import Layout
from mlpe.optimizer.memory import state_bytes_per_param
from mlpe.optimizer.models import ModelShape

PCIE_GBPS = 25.0  # host <-> GPU per GPU, one direction


@dataclasses.dataclass(frozen=True)
class Constants:
    """The step-time model's calibration constants (with each GPU's `achievable`,
    hardware.py); `mlpe bench plan` fits them on published runs (README)."""
    link_efficiency: float = 0.9  # NCCL bus bandwidth / link bandwidth (fitted)
    dp_overlap: float = 0.9  # of the overlappable compute that hides DP traffic (fitted)
    cp_overlap: float = 0.7  # of ring-attention traffic hidden behind attention
    fp8_efficiency: float = 0.7  # of the fp8 peak, on top of `achievable`
    gemm_knee: float = 256.0  # gemm_efficiency's half-efficiency dimension (fitted)


CONSTANTS = Constants()
CPU_ADAM_PARAMS_PER_S = 0.5e9  # CPU Adam throughput per GPU's share of the host


@dataclasses.dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_exposed_s: float
    bubble_s: float
    total_s: float
    # The parts, for explanations: communication volume by kind before overlap (s).
    dp_comm_s: float = 0.0
    tp_comm_s: float = 0.0
    pp_comm_s: float = 0.0
    cp_comm_s: float = 0.0
    ep_comm_s: float = 0.0
    offload_s: float = 0.0

    @property
    def bubble_fraction(self) -> float:
        return self.bubble_s / self.total_s if self.total_s else 0.0


def peak_tflops(gpu: GPU, precision: str, k: Constants = CONSTANTS) -> float:
    """The dense peak a precision trains at (fp8 already scaled by k.fp8_efficiency)."""
    if precision == "fp32":
        return gpu.tf32_tflops
    if precision == "bf16":
        return gpu.bf16_tflops
    if precision == "fp8":
        if not gpu.fp8_tflops:
            raise PlanInputError("training.precision", f"{gpu.name} has no fp8 tensor cores")
        return gpu.fp8_tflops * k.fp8_efficiency
    raise PlanInputError("training.precision", f"must be fp32, bf16 or fp8, got {precision!r}")


def mfu_peak_tflops(gpu: GPU, precision: str) -> float:
    return gpu.tf32_tflops if precision == "fp32" else gpu.bf16_tflops


def bubble_fraction(pp: Any, microbatches: Any, virtual_stages: Any = 1):
    """Share of a step the pipeline idles: (p - 1) / (m + p - 1) for 1F1B, with p - 1
    divided by v for the interleaved schedule."""
    p = np.asarray(pp, dtype=float)
    m = np.asarray(microbatches, dtype=float)
    idle = (p - 1) / np.asarray(virtual_stages, dtype=float)
    result = idle / (m + idle)
    return float(result) if result.ndim == 0 else result


def _ring(n, nbytes, gbps, passes, efficiency):
    """passes x (n-1)/n x bytes over a link of gbps GB/s at `efficiency` of it (an
    all-reduce is 2 passes)."""
    return np.where(n > 1, passes * (n - 1) / np.maximum(n, 1) * nbytes
                    / (gbps * 1e9 * efficiency), 0.0)


def time_arrays(model: ModelShape, cluster: Cluster, seq_len: int, global_batch: int,
                precision: str, optimizer: str, layout: Layout,
                k: Constants = CONSTANTS) -> dict[str, np.ndarray]:
    """Every StepTime field plus tokens_per_s and mfu, elementwise over a Layout of numpy
    arrays or of one layout."""
    a = layout.arrays()
    m, v = a.grad_accum, a.virtual_stages  # the module doc's micro-batches and chunks
    gpu = cluster.gpu
    world = a.gpus
    gpn = cluster.gpus_per_node
    act_b = 4.0 if precision == "fp32" else 2.0
    work_b = act_b  # weights and gradients travel in the compute dtype
    t_rep = np.where(a.sp, a.tp, 1.0)

    # Compute.
    tokens_step = float(global_batch) * seq_len
    attention = 12.0 * model.layers * model.hidden * seq_len
    dense_flops = 6.0 * model.matmul_params()
    rec_dense = np.where(a.recompute == 2, 4.0 / 3.0, 1.0)
    rec_attn = np.where(a.recompute >= 1, 4.0 / 3.0, 1.0)
    flops = tokens_step * (dense_flops * rec_dense + attention * rec_attn)
    tokens_mb = a.micro_batch * seq_len / a.cp
    gemm = 1.0 / (1.0 + k.gemm_knee / (model.hidden / a.tp) + k.gemm_knee / tokens_mb)
    rate = world * peak_tflops(gpu, precision, k) * 1e12 * gpu.achievable * gemm
    # Uneven pipelines: the stage with ceil(L / p) layers sets the pace.
    imbalance = np.ceil(model.layers / a.pp) * a.pp / model.layers
    compute = flops / rate * imbalance
    per_mb = compute / m  # one micro-batch on one stage

    # Parameters this GPU synchronises (its stage's share, before ZeRO).
    dense, expert = model.layer_params()
    layers_here = np.ceil(model.layers / a.pp)
    stage_dense = (layers_here * dense + np.where(
        a.pp <= 1, model.embedding_params() + model.head_params() + model.norm_params(),
        np.maximum(model.embedding_params(),
                   model.vocab * model.hidden + model.norm_params()))) / a.tp
    stage_expert = layers_here * expert / (a.tp * a.ep)

    def bandwidth(span):  # a group spanning `span` consecutive ranks
        return np.where(span <= gpn, cluster.intra_gbps, cluster.inter_gbps)

    # Data parallel.
    n_d = a.dp * a.cp
    n_e = np.maximum(n_d / a.ep, 1.0)
    bw_dp = bandwidth(a.tp * a.cp * a.dp)
    grad_bytes = work_b * stage_dense
    exp_bytes = work_b * stage_expert
    passes = np.where(a.zero_stage <= 1, 2.0,
                      np.where(a.zero_stage == 2, m + 1.0, 3.0 * m))
    dp_comm = (_ring(n_d, grad_bytes, bw_dp, passes, k.link_efficiency)
               + _ring(n_e, exp_bytes, bandwidth(a.tp * a.cp * a.dp / a.ep), passes,
                       k.link_efficiency))
    hideable = np.where(a.zero_stage <= 1, per_mb * 2.0 / 3.0, compute)
    dp_exposed = np.maximum(dp_comm * (1 - k.dp_overlap), dp_comm - k.dp_overlap * hideable)

    # Tensor parallel.
    tp_bytes = act_b * tokens_mb * model.hidden
    collectives = np.where(a.recompute == 2, 6.0, 4.0)
    tp_comm = (_ring(a.tp, tp_bytes, bandwidth(a.tp), 2.0, k.link_efficiency)
               * collectives * layers_here * m)

    # Context parallel: K and V chunks around the ring.
    kv_bytes = 2 * act_b * tokens_mb * model.kv_heads * model.head_dim / a.tp
    cp_comm = np.where(a.cp > 1, 3.0 * (a.cp - 1) * kv_bytes
                       / (bandwidth(a.tp * a.cp) * 1e9 * k.link_efficiency), 0.0)
    cp_comm = cp_comm * layers_here * m
    cp_exposed = cp_comm * (1 - k.cp_overlap)

    # Expert parallel.
    if model.moe:
        a2a_bytes = act_b * tokens_mb * model.hidden * model.top_k
        ep_comm = (_ring(a.ep, a2a_bytes, bandwidth(a.tp * a.cp * a.ep), 1.0,
                         k.link_efficiency) * 4.0 * layers_here * m)
    else:
        ep_comm = np.zeros_like(compute)

    # Pipeline point-to-point.
    pp_bytes = act_b * tokens_mb * model.hidden / t_rep
    pp_comm = np.where(a.pp > 1, 2.0 * m * v * pp_bytes
                       / (bandwidth(a.tp * a.cp * a.dp * 2) * 1e9 * k.link_efficiency), 0.0)

    # Offload.
    p_b, g_b, _ = state_bytes_per_param(precision, optimizer, model.hidden)
    shard = stage_dense / n_d + stage_expert / n_e
    pcie = PCIE_GBPS * 1e9
    offload_opt = (g_b + p_b) * shard / pcie + shard / CPU_ADAM_PARAMS_PER_S
    offload_params = 2.0 * p_b * shard * m / pcie * (1 - k.dp_overlap)
    offload_s = (np.where(a.offload >= 1, offload_opt, 0.0)
                 + np.where(a.offload >= 2, offload_params, 0.0))

    exposed = dp_exposed + tp_comm + cp_exposed + ep_comm + pp_comm + offload_s
    stage_per_mb = (compute + tp_comm + cp_exposed + ep_comm) / m
    bubble = np.where(a.pp > 1, (a.pp - 1) / v * stage_per_mb, 0.0)
    total = compute + exposed + bubble
    tokens_per_s = tokens_step / total
    mfu = (model.flops_per_token(seq_len) * tokens_per_s
           / (world * mfu_peak_tflops(gpu, precision) * 1e12))
    parts = {"compute_s": compute, "comm_exposed_s": exposed, "bubble_s": bubble,
             "total_s": total, "dp_comm_s": dp_comm, "tp_comm_s": tp_comm,
             "pp_comm_s": pp_comm, "cp_comm_s": cp_comm, "ep_comm_s": ep_comm,
             "offload_s": offload_s, "tokens_per_s": tokens_per_s, "mfu": mfu}
    shape = np.shape(total)
    return {k: np.broadcast_to(np.asarray(x, dtype=float), shape) for k, x in parts.items()}


def step_time(arrays: dict[str, np.ndarray], index: int | tuple = ()) -> StepTime:
    return StepTime(**{f.name: float(np.asarray(arrays[f.name])[index])
                       for f in dataclasses.fields(StepTime)})


def plan_time(model: ModelShape, cluster: Cluster, seq_len: int, global_batch: int,
              precision: str = "bf16", optimizer: str = "adamw", layout: Layout | None = None,
              **change: Any) -> tuple[StepTime, float, float]:
    """(StepTime, tokens/s, MFU) of one layout: `layout` with the fields in `change`
    replaced, e.g. plan_time(model, cluster, 4096, 256, tp=8, dp=4)."""
    layout = (Layout() if layout is None else layout).replace(**change)
    arrays = time_arrays(model, cluster, seq_len, global_batch, precision, optimizer, layout)
    return step_time(arrays), float(arrays["tokens_per_s"]), float(arrays["mfu"])
