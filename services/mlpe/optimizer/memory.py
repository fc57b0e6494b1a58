"""Per-GPU memory of a training layout: model states, activations, pipeline in-flight
micro-batches, temporary buffers and a reserve.

Model states follow ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models"). Mixed-precision Adam keeps, per parameter, 2 bytes
of bf16 weights, 2 of bf16 gradients and K = 12 of optimizer state (fp32 master weights,
m and v). Stage 1 shards the K bytes over the N_d data-parallel ranks, stage 2 the
gradients too, stage 3 the weights too:

    stage 0: (2 + 2 + K) Ψ      stage 1: (2 + 2) Ψ + K Ψ / N_d
    stage 2: 2 Ψ + (2 + K) Ψ / N_d      stage 3: (2 + 2 + K) Ψ / N_d

Other precisions and optimizers (bytes per parameter: weights, gradients, optimizer):
    fp32 AdamW 4 + 4 + 8 (m, v); bf16/fp8 AdamW 2 + 2 + 12 (fp8 adds 1 byte/parameter of
    fp8 weight copies cached between micro-batches, kept with the weights);
    SGD with momentum: fp32 4 + 4 + 4, mixed 2 + 2 + 8 (master + momentum);
    Adafactor (no first moment, factored second moment): fp32 4 + 4 + 8/hidden, mixed
    2 + 2 + 4 + 8/hidden (fp32 master; the row and column statistics are about 2 * hidden
    floats per hidden x hidden-sized matrix, i.e. ~8/hidden bytes per parameter).
Before ZeRO, tensor parallelism divides every layer's parameters by tp (norm weights too:
a small over-count of the saving), expert parallelism divides the experts by ep, and the
pipeline gives each stage layers/pp layers (ceil(layers/pp) for the fullest stage when pp
does not divide the layers). Simplification: the first stage also holds the
(vocab-parallel) input embedding, the last the LM head and final norm (a tied head is a
second copy of the embedding there, as Megatron-LM does); the planner reports the worse of
the two stages. ZeRO shards over the data-parallel ranks times the context-parallel ranks
(they hold the same weights; Megatron's distributed optimizer does the same); expert
weights over dp * cp / ep. Offload "optimizer" moves the optimizer state to CPU memory
(ZeRO-Offload); "params" moves weights, gradients and optimizer state (ZeRO-Infinity /
FSDP CPU offload), the GPU keeping only the gathered working set (in `temporary`); what
moves is reported as `host_offload` (per GPU) and must fit the nodes' CPU memory.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"), per layer and micro-batch of b sequences of s tokens, 16-bit
activations, hidden h, heads a, tensor-parallel size t:

    no parallelism:           s b h (34 + 5 a s / h)
    tensor + sequence par.:   s b h / t (34 + 5 a s / h)
    tensor parallel, no SP:   s b h (10 + 24 / t + 5 a s / (h t))
    selective recomputation (and flash attention): the 5 a s / h term goes
    full recomputation:       2 s b h (divided by t with SP): the layer input only

The constants 34 = 10 + 24 are the paper's GPT-3 architecture (MHA, GELU MLP of 4h,
dropout); here they are derived per architecture so that they reduce to exactly those:
replicated (not split by TP without SP) = 2 norm inputs + QKV input + MLP input (4
elements) + 2 one-byte dropout masks; split = Q + K and V (2 kv_heads / heads) + the
attention output + the MLP intermediates (GELU: its input and output, 2 ffn/h; SwiGLU:
gate, up and their product, 3 ffn/h; MoE: times top_k, plus the top_k dispatched token
copies); scores = softmax output (+ dropout mask and output) = (2 + 3 dropout) a s / h
bytes. fp32 training doubles the 2-byte terms (masks stay 1 byte). Context parallelism
cp splits s by cp (each rank's queries still see all s keys in the score term).
Embedding and output layers (the paper's Section 4.3, approximately): the first stage
keeps the embedding dropout mask (s b h, dropout models only); the last stage the final
norm input, the head input (2 s b h each, /t with SP) and fp32 logits for the
cross-entropy backward (4 s b v / t, vocab-parallel).

That count is for fused kernels (Megatron-LM's, or flash attention with fused norms and
activations): kernels="fused", the default. kernels="eager" is the same layer run as
plain PyTorch modules, as Hugging Face's llama / mistral / qwen2 / qwen3 do with
attn_implementation="eager" (measured by mlpe.bench.plan_accuracy: fp32 on the CPU, to
the byte; bf16 on the CPU within 0.1 %). Korthikanti's count under-predicts those by
21-33 %; what it misses, per layer and token (e the activation bytes, 4 in fp32, 2 in
bf16):
- RMSNorm upcasts to fp32 and keeps its fp32 input (4 h: pow and the multiply by rstd
  save it), rstd (4 bytes) and the normalised x * rstd (e h), besides its output (e h,
  saved by the next projection): 4 h + e h + 4 per norm instead of e h;
- RoPE's multiplications by cos / sin save only cos and sin (once for the model,
  2 s head_dim e), so the q / k projections' outputs are not kept (except by Qwen3's q / k
  norms, which keep them in fp32, their x * rstd and rstd); attention saves the rotated
  q (and k, below);
- eager attention's repeat_kv copies k and v to every head before the matmuls save them:
  GQA's smaller k / v (2 kv_heads / heads) does not show, 2 e h whatever kv_heads. With
  one kv head repeat_kv's expand reshapes to a stride-0 view, but matmul still copies it
  when it folds more than one sequence with the heads; one kv head and one sequence keep
  2 e h / heads;
- the probabilities: softmax in fp32 (4 a s, plus its copy in the model's dtype when
  that is narrower), which attention x V saves;
- SwiGLU keeps four intermediates, not three: the gate projection (SiLU's input), SiLU's
  output and the up projection (saved by their product) and the product (down's input):
  4 e ffn;
- the model: the token ids (int64), the final norm as above, the head's input, the
  log-probabilities in fp32 (log_softmax's output, 4 v per token: the logits themselves
  are not saved), the shifted targets (int64) and the loss's 4-byte weight total.
With flash=True (an SDPA / flash attention kernel) the attention keeps q, k and v at
their own head counts, the output and an fp32 logsumexp per head instead (not measured
on Hugging Face models; it is what the worker's GPT does on its references, which the
eager count matches within 1 % without recomputation).
Both counts: a fused qkv projection (ModelShape.fused_qkv: the worker's GPT, whose q, k
and v are views of its output) keeps that whole output alive while v is saved, so with
RoPE the unrotated q and k stay besides the rotated ones ((1 + kv_heads / heads) h
elements).

Pipeline (1F1B, Narayanan et al. 2021): stage i holds p - i micro-batches in flight, so
the first stage holds min(p, m) micro-batches of its layers/p layers (the whole model's
worth of activations); with v interleaved chunks per stage the first stage holds
L (1 + (p - 1) / (p v)) layers' worth (Korthikanti, Section 4.2.3), i.e. warm-up
min(v p + p - 1, v m) chunk micro-batches. `activations` is one micro-batch's worth on the
stage, `pipeline_inflight` the extra micro-batches.

Temporary buffers (approximate): full recomputation rebuilds one layer's activations in
backward; the backward working set (gradient of the residual stream and of the widest
intermediate); plus the largest of: ZeRO-3 / offload gathered weights (two layers,
prefetching) and one layer's unsharded gradients, the sequence-parallel all-gather of a
layer input, and on the last stage the logits and their fp32 gradient.
Reserve: RESERVE_BYTES for the CUDA context, cuBLAS workspaces and NCCL buffers, plus
FRAGMENTATION of everything else for the caching allocator.

`worker_activation_bytes` is a second, architecture-exact mode: the bytes that one forward
of mlpe.worker.model.GPT saves for backward, on its fused kernels or on the references
(validated by mlpe.bench.plan_accuracy, which measures them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.layout import Layout, code
from mlpe.optimizer.models import ModelShape

GIB = 2**30
RESERVE_BYTES = 1.0 * GIB  # CUDA context (~0.5 GiB), cuBLAS workspaces, NCCL buffers
FRAGMENTATION = 0.05  # caching-allocator fragmentation, a fraction of everything else

PRECISIONS = ("fp32", "bf16", "fp8")
OPTIMIZERS = ("adamw", "sgd", "adafactor")
KERNELS = ("fused", "eager")  # what the activation model counts; see the module doc


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU (of the worst pipeline stage)."""
    params: float
    grads: float
    optimizer: float
    activations: float  # one micro-batch in flight
    pipeline_inflight: float  # the other micro-batches the schedule keeps in flight
    temporary: float
    reserve: float
    host_offload: float = 0.0  # bytes moved to CPU memory by offload (not in total)

    @property
    def total(self) -> float:
        """Bytes on the GPU."""
        return (self.params + self.grads + self.optimizer + self.activations
                + self.pipeline_inflight + self.temporary + self.reserve)

    def gib(self) -> dict[str, float]:
        parts = {f.name: getattr(self, f.name) / GIB for f in dataclasses.fields(self)}
        parts["total"] = self.total / GIB
        return parts

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in self.gib().items()) + " GiB"


# -- model states ---------------------------------------------------------------------------
def state_bytes_per_param(precision: str, optimizer: str,
                          hidden: int = 4096) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per parameter; see the module doc."""
    if precision not in PRECISIONS:
        raise PlanInputError("training.precision", f"must be one of {', '.join(PRECISIONS)}, "
                                                   f"got {precision!r}")
    if optimizer not in OPTIMIZERS:
        raise PlanInputError("training.optimizer", f"must be one of {', '.join(OPTIMIZERS)}, "
                                                   f"got {optimizer!r}")
    factored = 8.0 / hidden
    if precision == "fp32":
        opt = {"adamw": 8.0, "sgd": 4.0, "adafactor": factored}[optimizer]
        return 4.0, 4.0, opt
    opt = {"adamw": 12.0, "sgd": 8.0, "adafactor": 4.0 + factored}[optimizer]
    return (3.0 if precision == "fp8" else 2.0), 2.0, opt


def zero_model_states(psi: float, zero_stage: int, n_d: int, k: float = 12.0,
                      param_bytes: float = 2.0,
                      grad_bytes: float = 2.0) -> tuple[float, float, float]:
    """ZeRO's per-GPU (weights, gradients, optimizer) bytes for Ψ parameters, K bytes of
    optimizer state per parameter and N_d data-parallel ranks (Rajbhandari et al. 2020)."""
    if zero_stage not in (0, 1, 2, 3):
        raise PlanInputError("plan.zero_stage", f"must be 0, 1, 2 or 3, got {zero_stage}")
    return (param_bytes * psi / (n_d if zero_stage >= 3 else 1),
            grad_bytes * psi / (n_d if zero_stage >= 2 else 1),
            k * psi / (n_d if zero_stage >= 1 else 1))


def activation_bytes_per_unit(precision: str) -> float:
    """Bytes of one saved activation element: bf16 (and fp8 recipes, which keep most
    saved activations in bf16) 2, fp32 4."""
    return 4.0 if precision == "fp32" else 2.0


# -- activations (Korthikanti et al.) ---------------------------------------------------------
def _layer_terms(model: ModelShape) -> tuple[float, float, float, float, float]:
    """Per token and hidden unit: (replicated elements, replicated mask bytes, split
    elements, score elements per a*s/h, score mask bytes per a*s/h); see the module doc."""
    rep = 4.0
    rep_mask = 2.0 if model.dropout else 0.0
    ratio = model.ffn / model.hidden
    mlp = (3.0 if model.ffn_type == "swiglu" else 2.0) * ratio
    if model.moe:
        mlp = model.top_k * (mlp + 1.0)
    split = 1.0 + 2.0 * model.kv_heads / model.heads + 1.0 + mlp + _unrotated_qk(model)
    score = 2.0 if model.dropout else 1.0
    score_mask = 1.0 if model.dropout else 0.0
    return rep, rep_mask, split, score, score_mask


def _unrotated_qk(model: ModelShape) -> float:
    """Elements per token and hidden unit of the unrotated q and k that a fused qkv
    projection's output keeps alive under RoPE (v, a view of it, is saved)."""
    if not model.fused_qkv or model.pos_embedding:
        return 0.0
    return 1.0 + model.kv_heads / model.heads


def _eager_layer_bytes(model: ModelShape, e: float, flash: bool,
                       micro_batch: Any) -> tuple[Any, Any, float]:
    """kernels="eager": per token and hidden unit, in bytes, (replicated, split by TP,
    scores per a*s/h) of a layer run as plain PyTorch modules (Hugging Face's eager
    attention when flash is False); see the module doc."""
    h = model.hidden
    kv = model.kv_heads / model.heads
    # RMSNorm: fp32 input, x * rstd, rstd; LayerNorm: input, fp32 mean and rstd.
    norm = 4.0 + e + 4.0 / h if model.norm == "rmsnorm" else e + 8.0 / h
    rep = 2 * norm + 2 * e + (2.0 if model.dropout else 0.0)  # + the norms' outputs, masks
    # flash: q, k, v, the output and an fp32 logsumexp per head; eager: q, k and v
    # repeated to every head (copies, except for one kv head and one sequence: stride-0
    # views), the output.
    repeated = np.where((model.kv_heads > 1) | (np.asarray(micro_batch) > 1), 1.0, kv)
    attention = (e * (2.0 + 2.0 * kv) + 4.0 * model.heads / h if flash
                 else e * (2.0 + 2.0 * repeated))
    if model.qk_norm:  # per head: fp32 input, x * rstd, rstd
        attention += (4.0 + e) * (1.0 + kv) + 4.0 * (model.heads + model.kv_heads) / h
    attention += e * _unrotated_qk(model)
    mlp = (4.0 if model.ffn_type == "swiglu" else 2.0) * e * model.ffn / h
    if model.moe:
        mlp = model.top_k * (mlp + e)
    score = 4.0 + (e if e < 4 else 0.0) + ((e + 1.0) if model.dropout else 0.0)
    return rep, attention + mlp, score


def layer_activation_bytes(model: ModelShape, seq_len: int, micro_batch: float,
                           tp: Any = 1, sp: Any = False, recompute: Any = "none",
                           flash: bool = False, cp: Any = 1, act_bytes: float = 2.0,
                           kernels: str = "fused"):
    """Activation bytes one layer keeps for backward for one micro-batch (Korthikanti et
    al. 2022, generalised per architecture, for fused kernels; kernels="eager": plain
    PyTorch modules; see the module doc). Works elementwise on numpy arrays of tp, sp,
    recompute codes (0 none, 1 selective, 2 full), cp."""
    rec = code("recompute", recompute)
    tp, cp = np.asarray(tp, dtype=float), np.asarray(cp, dtype=float)
    t_rep = np.where(np.asarray(sp, dtype=bool), tp, 1.0)
    tokens_h = (seq_len / cp) * micro_batch * model.hidden
    if _kernels(kernels) == "eager":
        rep_b, split_b, score_b = _eager_layer_bytes(model, act_bytes, flash, micro_batch)
    else:
        rep, rep_mask, split, score, score_mask = _layer_terms(model)
        rep_b, split_b = rep * act_bytes + rep_mask, split * act_bytes
        score_b = score * act_bytes + score_mask
    scores = 0.0 if flash else score_b * model.heads * seq_len / (model.hidden * tp)
    none = tokens_h * (rep_b / t_rep + split_b / tp + scores)
    selective = tokens_h * (rep_b / t_rep + split_b / tp)
    full = tokens_h * act_bytes / t_rep
    return np.where(rec == 0, none, np.where(rec == 1, selective, full))


def _kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise PlanInputError("training.kernels", f"must be one of {', '.join(KERNELS)}, got "
                                                 f"{kernels!r}")
    return kernels


def inflight_microbatches(pp: Any, grad_accum: Any, virtual_stages: Any = 1):
    """Micro-batches (in units of a stage's layers) the first pipeline stage holds at
    once: min(p, m) for 1F1B, min(v p + p - 1, v m) / v chunks for the interleaved
    schedule with v > 1 chunks per stage; 1 without a pipeline."""
    p = np.asarray(pp, dtype=float)
    m = np.asarray(grad_accum, dtype=float)
    v = np.asarray(virtual_stages, dtype=float)
    plain = np.minimum(p, m)
    interleaved = np.minimum(v * p + p - 1, v * m) / v
    return np.where(p <= 1, 1.0, np.where(v <= 1, plain, interleaved))


# -- the whole GPU --------------------------------------------------------------------------
def memory_arrays(model: ModelShape, seq_len: int, precision: str, optimizer: str,
                  layout: Layout, *, flash: bool = True,
                  kernels: str = "fused") -> dict[str, np.ndarray]:
    """Every component of MemoryBreakdown, in bytes, elementwise over a Layout of numpy
    arrays (the planner evaluates thousands at once) or of one layout. Returns the worse of
    the first and last pipeline stages, per layout, plus "total" and "stage" (0 first, 1
    last), and "host_offload": the bytes offload puts in CPU memory, per GPU."""
    a = layout.arrays()
    p_b, g_b, o_b = state_bytes_per_param(precision, optimizer, model.hidden)
    act_b = activation_bytes_per_unit(precision)
    t_rep = np.where(a.sp, a.tp, 1.0)

    # Parameters per GPU before ZeRO, by stage.
    dense, expert = model.layer_params()
    layers_here = np.ceil(model.layers / a.pp)  # uneven pipelines: the fullest stage
    dense_local = layers_here * dense / a.tp
    expert_local = layers_here * expert / (a.tp * a.ep)
    head = model.vocab * model.hidden if model.tied else model.head_params()
    tail = model.head_params() + model.norm_params()
    single = a.pp <= 1
    first_extra = (model.embedding_params() + np.where(single, tail, 0.0)) / a.tp
    last_extra = np.where(single, model.embedding_params() + tail,
                          head + model.norm_params()) / a.tp
    n_d = a.dp * a.cp
    n_e = np.maximum(a.dp * a.cp / a.ep, 1.0)

    def states(extra):
        shard_d, shard_e = dense_local + extra, expert_local
        params = p_b * (shard_d / np.where(a.zero_stage >= 3, n_d, 1.0)
                        + shard_e / np.where(a.zero_stage >= 3, n_e, 1.0))
        grads = g_b * (shard_d / np.where(a.zero_stage >= 2, n_d, 1.0)
                       + shard_e / np.where(a.zero_stage >= 2, n_e, 1.0))
        opt = o_b * (shard_d / np.where(a.zero_stage >= 1, n_d, 1.0)
                     + shard_e / np.where(a.zero_stage >= 1, n_e, 1.0))
        host = (np.where(a.offload >= 1, opt, 0.0)
                + np.where(a.offload >= 2, params + grads, 0.0))
        opt = np.where(a.offload >= 1, 0.0, opt)
        params = np.where(a.offload >= 2, 0.0, params)
        grads = np.where(a.offload >= 2, 0.0, grads)
        return params, grads, opt, host

    def layer_bytes(recompute, flash):  # one layer's activations, one micro-batch
        return layer_activation_bytes(model, seq_len, a.micro_batch, a.tp, a.sp, recompute,
                                      flash, a.cp, act_b, kernels)

    # Activations per micro-batch.
    per_layer = layer_bytes(a.recompute, flash)
    tokens = seq_len / a.cp * a.micro_batch
    first_act = layers_here * per_layer + (tokens * model.hidden / t_rep
                                           if model.dropout else 0.0)
    logits = 4.0 * tokens * model.vocab / a.tp
    last_tail = 2 * act_b * tokens * model.hidden / t_rep + logits
    if _kernels(kernels) == "eager":
        # Every stage: RoPE's cos and sin (1 x s x head_dim each); the first the int64
        # token ids; the last the final norm (as a layer's), the head's input, the fp32
        # log-probabilities (logits), the int64 targets and the loss's weight total.
        rotary = 0.0 if model.pos_embedding else 2 * act_b * seq_len / a.cp * model.head_dim
        first_act = first_act + rotary + 8.0 * tokens
        norm = (4.0 + act_b + 4.0 / model.hidden if model.norm == "rmsnorm"
                else act_b + 8.0 / model.hidden)
        last_tail = ((norm + act_b) * tokens * model.hidden / t_rep + logits + 8.0 * tokens
                     + 4.0)
        last_act = layers_here * per_layer + last_tail + rotary
    else:
        last_act = layers_here * per_layer + last_tail
    first_act = first_act + np.where(single, last_tail, 0.0)
    inflight_first = inflight_microbatches(a.pp, a.grad_accum, a.virtual_stages)
    v = a.virtual_stages
    inflight_last = np.where(v > 1, np.minimum((v - 1) * a.pp + 1, v * a.grad_accum) / v, 1.0)
    inflight_last = np.where(single, 1.0, inflight_last)

    # Temporaries.
    full_layer = layer_bytes(0, flash)
    # Selective recomputation rebuilds one layer's attention scores (flash attention
    # rebuilds them tile by tile: nothing layer-sized).
    scores_only = 0.0 if flash else layer_bytes(0, False) - layer_bytes(1, False)
    rebuilt = np.where(a.recompute == 2, full_layer,
                       np.where(a.recompute == 1, scores_only, 0.0))
    widest = model.ffn * (2 if model.ffn_type == "swiglu" else 1) * model.top_k
    grad_work = act_b * tokens * (2 * model.hidden / t_rep + widest / a.tp)
    work_b = 4.0 if precision == "fp32" else 2.0
    layer_local = (dense / a.tp + expert / (a.tp * a.ep))
    gathered = np.where((a.zero_stage >= 3) | (a.offload >= 2),
                        2 * work_b * layer_local + g_b * layer_local, 0.0)
    sp_gather = np.where(a.sp, act_b * tokens * model.hidden, 0.0)
    logits_tmp = (act_b + 4.0) * tokens * model.vocab / a.tp
    base_tmp = rebuilt + grad_work
    first_tmp = base_tmp + np.maximum(np.maximum(gathered, sp_gather),
                                      np.where(single, logits_tmp, 0.0))
    last_tmp = base_tmp + np.maximum(np.maximum(gathered, sp_gather), logits_tmp)

    out = {}
    stages = []
    for extra, act, inflight, tmp in ((first_extra, first_act, inflight_first, first_tmp),
                                      (last_extra, last_act, inflight_last, last_tmp)):
        params, grads, opt, host = states(extra)
        extra_inflight = (inflight - 1.0) * act
        sub = params + grads + opt + act + extra_inflight + tmp
        reserve = RESERVE_BYTES + FRAGMENTATION * sub
        stages.append({"params": params, "grads": grads, "optimizer": opt,
                       "activations": act, "pipeline_inflight": extra_inflight,
                       "temporary": tmp, "reserve": reserve, "host_offload": host,
                       "total": sub + reserve})
    worse_last = stages[1]["total"] > stages[0]["total"]
    for key in stages[0]:
        out[key] = np.where(worse_last, stages[1][key], stages[0][key])
    out["stage"] = worse_last.astype(int)
    return out


def breakdown(arrays: dict[str, np.ndarray], index: int | tuple = ()) -> MemoryBreakdown:
    """The MemoryBreakdown of one layout of memory_arrays' result."""
    return MemoryBreakdown(**{f.name: float(np.asarray(arrays[f.name])[index])
                              for f in dataclasses.fields(MemoryBreakdown)})


def plan_memory(model: ModelShape, seq_len: int, precision: str = "bf16",
                optimizer: str = "adamw", layout: Layout | None = None, *, flash: bool = True,
                kernels: str = "fused", **change: Any) -> MemoryBreakdown:
    """Per-GPU memory of one layout (the worse pipeline stage): `layout` with the fields
    in `change` replaced, e.g. plan_memory(model, 4096, tp=8, dp=4)."""
    layout = (Layout() if layout is None else layout).replace(**change)
    return breakdown(memory_arrays(model, seq_len, precision, optimizer, layout, flash=flash,
                                   kernels=kernels))


# -- the worker's GPT, exactly ----------------------------------------------------------------
def worker_activation_bytes(cfg: Any, batch: int, seq: int | None = None,
                            dtype_bytes: int = 4, recompute: str | None = None,
                            fused: bool = True) -> int:
    """Bytes that one training forward of mlpe.worker.model.GPT(cfg) (with targets, model
    in one dtype of dtype_bytes, no autocast) keeps for backward, parameters and buffers
    excluded, counting each storage once. Derived from the code:

    - embedding: the token ids (int64);
    - fused RMSNorm (RMSNormFunction): h (the input, or input + residual: a new tensor) and
      rstd (fp32, one per row); its output is saved by the next nn.Linear (a Linear saves
      its input). The first block's h is the embedding output itself;
    - attention: the qkv projection's output stays alive whole, because v (a view of it)
      is saved by scaled_dot_product_attention, which saves q and k (new tensors from RoPE:
      its Function keeps only the cos/sin buffers), v, the output (b, s, heads, d) and the
      logsumexp (fp32, b x heads x s); the output reshapes to the out projection's input
      without a copy;
    - SwiGLU (SwiGLUFunction): gate and up; its output is down_proj's input;
    - final norm: h and rstd (its output is not saved: the fused head consumes it);
    - linear_cross_entropy: grad_x (tokens x hidden) and grad_w (vocab x hidden), computed
      in forward.
    The references (CPU, or MLPE_KERNELS=reference) save more: each RMSNorm keeps its
    input in fp32, x * rstd (fp32) and its output; SiLU keeps its fp32 input, its output
    and the fp32 up; the head keeps fp32 log-probabilities (tokens x vocab), the targets
    and a scalar. recompute="full" (torch checkpoint, non-reentrant) keeps each block's
    inputs (the first block's: the embedding output; then the MLP output and the residual
    stream) and nothing inside the blocks.
    """
    seq = cfg.seq_len if seq is None else seq
    recompute = cfg.recompute if recompute is None else recompute
    if recompute not in ("none", "full"):
        raise PlanInputError("model.recompute", f"the worker supports none or full, got "
                                                f"{recompute!r}")
    e = dtype_bytes
    t = batch * seq
    h, f, v_, layers = cfg.hidden, cfg.ffn_size, cfg.vocab, cfg.layers
    d, a, k = cfg.head_dim, cfg.heads, cfg.kv_heads
    tokens = 8 * t
    if fused:
        norm_saved = e * t * h + 4 * t  # h (new) and rstd
        head = e * t * h + 4 * t + e * t * h + e * v_ * h  # final norm h, rstd; grad_x, grad_w
    else:
        weight_copy = 4 * h if e < 4 else 0
        norm_saved = 4 * t * h + 4 * t + 4 * t * h + e * t * h + weight_copy
        head = norm_saved + 4 * t * v_ + 8 * t + 4
    if recompute == "full":
        return tokens + e * t * h + (layers - 1) * 2 * e * t * h + head
    attention = e * t * ((a + 2 * k) * d + a * d + k * d + a * d) + 4 * batch * a * seq
    if fused:
        # The two norms' h, rstd and outputs (block 0's first h is the embedding output).
        norms = 2 * norm_saved + 2 * e * t * h
        return tokens + layers * (norms + attention + 3 * e * t * f) + head
    mlp = 12 * t * f + e * t * f
    per_block = 2 * norm_saved + attention + mlp
    return tokens + layers * per_block + head


def worker_state_bytes(cfg: Any, dtype_bytes: int = 4) -> dict[str, int]:
    """The worker's model states: weights and gradients in the model's dtype, FusedAdamW's
    exp_avg and exp_avg_sq in fp32 (8 bytes per parameter, no master copy), and the RoPE
    cos/sin buffers (fp32, seq_len x head_dim/2 each, one pair per block)."""
    from mlpe.optimizer.models import worker_model

    n = worker_model(cfg).params()
    return {"params": n * dtype_bytes, "grads": n * dtype_bytes, "optimizer": 8 * n,
            "buffers": cfg.layers * cfg.seq_len * cfg.head_dim * 4}
