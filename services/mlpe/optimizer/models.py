"""Transformer shapes: parameter counts and FLOPs, without torch.

A ModelShape describes a decoder-only transformer closely enough to count its parameters
exactly (embeddings, attention with grouped-query heads, dense or mixture-of-experts MLP,
norms, LM head) and to size its activations. Presets are the published architectures;
`worker_model` describes the worker's own GPT (mlpe.worker.model), parameter for parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mlpe.optimizer.errors import PlanInputError

FFN_TYPES = ("swiglu", "gelu")
NORMS = ("rmsnorm", "layernorm")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int  # MLP intermediate size (per expert for MoE)
    ffn_type: str  # "swiglu" (gate, up, down) or "gelu" (up, down)
    vocab: int
    seq_len: int  # the context length it was trained at (the default for planning)
    tied: bool  # LM head shares the embedding matrix
    experts: int = 1
    top_k: int = 1
    norm: str = "rmsnorm"  # "layernorm" has a bias too
    bias: bool = False  # biases in every linear layer (GPT-2)
    pos_embedding: bool = False  # learned absolute positions, seq_len x hidden (GPT-2)
    dropout: bool = False  # trained with dropout (its masks are activations too)
    qkv_bias: bool = False  # biases on the q, k and v projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm of each head's q and k before RoPE (Qwen3)
    # One q/k/v projection whose output q, k and v are views of (the worker's GPT):
    # with RoPE the unrotated q and k stay alive in it while v is saved.
    fused_qkv: bool = False

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len",
                     "experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanInputError(f"model.{name}", f"must be a whole number ≥ 1, got "
                                                      f"{value!r}")
        if self.ffn_type not in FFN_TYPES:
            raise PlanInputError("model.ffn_type", f"must be one of {', '.join(FFN_TYPES)}, "
                                                   f"got {self.ffn_type!r}")
        if self.norm not in NORMS:
            raise PlanInputError("model.norm", f"must be one of {', '.join(NORMS)}, got "
                                               f"{self.norm!r}")
        if self.hidden % self.heads:
            raise PlanInputError("model.heads", f"hidden {self.hidden} is not divisible by "
                                                f"heads {self.heads}")
        if self.heads % self.kv_heads:
            raise PlanInputError("model.kv_heads", f"heads {self.heads} is not divisible by "
                                                   f"kv_heads {self.kv_heads}")
        if self.top_k > self.experts:
            raise PlanInputError("model.top_k", f"top_k {self.top_k} is more than experts "
                                                f"{self.experts}")

    # -- parameter counts ---------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def moe(self) -> bool:
        return self.experts > 1

    def attention_params(self) -> int:
        """One layer's attention: q and out (heads x head_dim), k and v (kv_heads x
        head_dim), their biases if any (q, k and v only with qkv_bias), and the q and k
        norms' weights (head_dim each) with qk_norm."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        weights = self.hidden * (q + 2 * kv) + q * self.hidden
        biases = (q + 2 * kv + self.hidden if self.bias else
                  q + 2 * kv if self.qkv_bias else 0)
        return weights + biases + (2 * self.head_dim if self.qk_norm else 0)

    def expert_params(self) -> int:
        """One MLP (one expert of an MoE layer): 3 matrices for SwiGLU, 2 for GELU."""
        if self.ffn_type == "swiglu":
            return 3 * self.hidden * self.ffn + ((2 * self.ffn + self.hidden)
                                                 if self.bias else 0)
        return 2 * self.hidden * self.ffn + ((self.ffn + self.hidden) if self.bias else 0)

    def norm_params(self) -> int:
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    def layer_params(self) -> tuple[int, int]:
        """(dense, expert) parameters of one layer: dense = attention, two norms, the
        router, and the MLP of a dense model; expert = the experts' MLPs of an MoE layer
        (what expert parallelism splits)."""
        dense = self.attention_params() + 2 * self.norm_params()
        if self.moe:
            return dense + self.hidden * self.experts, self.experts * self.expert_params()
        return dense + self.expert_params(), 0

    def embedding_params(self) -> int:
        return self.vocab * self.hidden + (self.seq_len * self.hidden
                                           if self.pos_embedding else 0)

    def head_params(self) -> int:
        """The LM head's own parameters (0 when tied to the embedding)."""
        return 0 if self.tied else self.vocab * self.hidden

    def params(self) -> int:
        """Total parameters: embeddings, every layer (all experts), final norm, LM head."""
        dense, expert = self.layer_params()
        return (self.embedding_params() + self.layers * (dense + expert) + self.norm_params()
                + self.head_params())

    def active_params(self) -> int:
        """Parameters one token goes through: an MoE layer's top_k experts only."""
        dense, _ = self.layer_params()
        return (self.embedding_params() + self.layers * (dense + self.top_k
                                                         * (self.expert_params() if self.moe
                                                            else 0))
                + self.norm_params() + self.head_params())

    def matmul_params(self) -> int:
        """Active parameters that multiply: active_params less the input embedding and
        position tables (lookups, no FLOPs); the LM head (tied or not) counts."""
        return (self.active_params() - self.embedding_params()
                + (self.vocab * self.hidden if self.tied else 0))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM/Megatron convention:
        6 * N + 12 * layers * hidden * seq_len, with N = matmul_params() (active, input
        embedding excluded, LM head included) and the attention term counting QK^T and
        attention x V over the full sequence: causal masking is NOT halved (as Megatron-LM
        and PaLM's MFU figures count it). Recomputation is not included: these are model
        FLOPs, as MFU uses."""
        seq = self.seq_len if seq_len is None else seq_len
        return 6.0 * self.matmul_params() + 12.0 * self.layers * self.hidden * seq

    def describe(self) -> str:
        kind = (f"MoE {self.experts} experts top-{self.top_k}, " if self.moe else "")
        return (f"{self.name}: {self.params() / 1e9:.2f}B params ({kind}{self.layers} layers, "
                f"hidden {self.hidden}, {self.heads} heads / {self.kv_heads} kv, ffn "
                f"{self.ffn} {self.ffn_type}, vocab {self.vocab})")


def _gpt2(name: str, layers: int, hidden: int, heads: int) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, heads, 4 * hidden, "gelu", 50257, 1024,
                      tied=True, norm="layernorm", bias=True, pos_embedding=True,
                      dropout=True)


def _llama(name: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int,
           vocab: int, seq_len: int, **kw: Any) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, kv_heads, ffn, "swiglu", vocab, seq_len,
                      tied=False, **kw)


MODELS: dict[str, ModelShape] = {m.name: m for m in (
    _gpt2("gpt2-small", 12, 768, 12),
    _gpt2("gpt2-medium", 24, 1024, 16),
    _gpt2("gpt2-large", 36, 1280, 20),
    _gpt2("gpt2-xl", 48, 1600, 25),
    _llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
    _llama("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 4096),
    _llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 4096),
    _llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192),
    _llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192),
    _llama("llama3-405b", 126, 16384, 128, 8, 53248, 128256, 8192),
    _llama("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, 32768, experts=8, top_k=2),
)}


def build_model(preset: str | None = None, **overrides: Any) -> ModelShape:
    """A preset (case-insensitive) with fields overridden, or, with preset None, a model
    from the fields alone; every impossible value raises PlanInputError("model.<field>")."""
    fields = {f.name for f in dataclasses.fields(ModelShape)}
    for key in overrides:
        if key not in fields:
            raise PlanInputError(f"model.{key}", f"unknown field: expected one of "
                                                 f"{', '.join(sorted(fields))}")
    if preset is None:
        missing = [f.name for f in dataclasses.fields(ModelShape)
                   if f.default is dataclasses.MISSING and f.name not in overrides
                   and f.name != "name"]
        if missing:
            raise PlanInputError(f"model.{missing[0]}", "required without a preset")
        return ModelShape(**{"name": "custom", **overrides})
    key = str(preset).strip().lower()
    if key not in MODELS:
        raise PlanInputError("model.preset", f"unknown model {preset!r}: expected one of "
                                             f"{', '.join(MODELS)}")
    base = MODELS[key]
    if not overrides:
        return base
    return dataclasses.replace(base, **overrides)


# Hugging Face model types that are this kind of decoder (RMSNorm, RoPE, grouped-query
# attention, SwiGLU) and what sets them apart.
HF_LLAMA_FAMILY = {"llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True},
                   "qwen3": {"qk_norm": True}}


def from_hf_config(config: Any) -> ModelShape:
    """The ModelShape of a Hugging Face llama / mistral / qwen2 / qwen3 config (a
    transformers PretrainedConfig, or anything with its attribute names; transformers is
    not imported). Qwen2's q/k/v biases and Qwen3's q/k norms are kept; a head_dim other
    than hidden / heads, Llama's attention_bias without its mlp_bias (or the other way
    round), and other model types raise PlanInputError."""
    kind = getattr(config, "model_type", None)
    if kind not in HF_LLAMA_FAMILY:
        raise PlanInputError("model.model_type", f"must be one of "
                                                 f"{', '.join(HF_LLAMA_FAMILY)}, got {kind!r}")
    extra = dict(HF_LLAMA_FAMILY[kind])
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise PlanInputError("model.head_dim", f"head_dim {head_dim} x heads {heads} is not "
                                               f"hidden {hidden}")
    # Llama's and Mistral's attention_bias (q, k, v and o) and mlp_bias: both or neither.
    attention_bias = bool(getattr(config, "attention_bias", False))
    if attention_bias != bool(getattr(config, "mlp_bias", False)):
        raise PlanInputError("model.bias", "attention_bias without mlp_bias (or the other "
                                           "way round) is not modelled")
    if attention_bias:
        extra["bias"] = True
    kv = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(name=f"hf-{kind}", layers=config.num_hidden_layers, hidden=hidden,
                      heads=heads, kv_heads=kv, ffn=config.intermediate_size,
                      ffn_type="swiglu", vocab=config.vocab_size,
                      seq_len=config.max_position_embeddings,
                      tied=bool(getattr(config, "tie_word_embeddings", False)),
                      norm="rmsnorm", **extra)


def worker_model(cfg: Any) -> ModelShape:
    """The worker's GPT (mlpe.worker.model.GPT) for a mlpe.common.jobs.GPTConfig:
    RMSNorm (weight only), RoPE (buffers, no parameters), grouped-query attention with a
    fused qkv projection and an out projection, no biases, SwiGLU MLP of cfg.ffn_size, a
    final RMSNorm and an LM head (tied to the embedding when cfg.tied)."""
    return ModelShape(name="worker", layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads,
                      kv_heads=cfg.kv_heads, ffn=cfg.ffn_size, ffn_type="swiglu",
                      vocab=cfg.vocab, seq_len=cfg.seq_len, tied=cfg.tied, norm="rmsnorm",
                      fused_qkv=True)
