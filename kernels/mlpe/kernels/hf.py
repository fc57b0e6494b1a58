"""One call that makes a Hugging Face Llama-family causal LM (llama, mistral, qwen2, qwen3)
run on mlpe.kernels:

    model = AutoModelForCausalLM.from_pretrained(...)
    apply_mlpe_kernels(model)               # this instance only
    apply_mlpe_kernels(model_type="qwen3")  # or: every qwen3 model built from now on

What it replaces: every RMSNorm (qwen3's q_norm/k_norm too) -> rmsnorm; silu(gate) * up in
the MLP -> swiglu; the rotary embedding of q and k -> rope; and, in training with labels,
the LM head + loss -> linear_cross_entropy, so the (tokens, vocab) logits never exist
(outputs.logits is None then). Without labels, or in eval, logits are computed as HF does,
so generation and evaluation are unchanged. Each op picks Triton or its PyTorch reference
(mlpe.kernels.dispatch); on the reference path the numbers are HF's within
mlpe.kernels.tolerances.

The loss follows HF's ForCausalLMLoss: labels shifted left by one (or `shift_labels`),
ignore_index -100, and with `num_items_in_batch` (gradient accumulation, as the Trainer
passes it) the sum of the token losses over num_items_in_batch instead of this
micro-batch's mean. One difference: a micro-batch whose labels are all ignored gives a zero
loss (gradients of zeros) instead of HF's NaN when num_items_in_batch is not given.

A model whose hidden_act is not silu keeps HF's MLP (noted in the returned list; the other
ops still apply). An LM head that is not a plain nn.Linear (quantised, LoRA-wrapped) is
computed by HF's code. Patching an instance sets `forward` on its own modules; the one
module-level change, the family's `apply_rotary_pos_emb`, becomes a switch that runs ours
only inside a patched attention module, so other instances compute exactly what they did.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from mlpe.kernels.linear_cross_entropy import linear_cross_entropy as _linear_cross_entropy
from mlpe.kernels.rmsnorm import rmsnorm as _rmsnorm
from mlpe.kernels.rope import rope as _rope
from mlpe.kernels.swiglu import swiglu as _swiglu

log = logging.getLogger("mlpe.kernels")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_SILU = (nn.SiLU, SiLUActivation)  # what ACT2FN gives for "silu" and "swish"

# Set while a patched attention module runs: the family's apply_rotary_pos_emb, which its
# attention forward looks up at call time, then runs ours (see _install_rope_switch).
_OUR_ROPE = contextvars.ContextVar("mlpe_rope", default=False)
_CLASS_ORIGINALS: dict[type, object] = {}  # what model_type patching replaced: _unpatch_classes


def _ours(part: str):
    """Marks a replacement; the mark reads through bound methods too, so a patched forward
    is recognised on an instance and on a class (what makes patching idempotent)."""
    def mark(fn):
        fn._mlpe = part
        return fn
    return mark


# ---- the replacement forwards (bound to HF's modules, so `self` is theirs) ----

@_ours("rms_norm")
def _rmsnorm_forward(self, hidden_states):
    y = _rmsnorm(hidden_states, self.weight, self.variance_epsilon)
    # HF returns weight * normalised: an fp32 weight promotes a bf16 input; keep that dtype.
    return y.to(torch.promote_types(y.dtype, self.weight.dtype))


@_ours("swiglu")
def _swiglu_mlp_forward(self, x):
    if not isinstance(self.act_fn, _SILU):  # class patching: a model built with another act
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return self.down_proj(_swiglu(self.gate_proj(x), self.up_proj(x)))


def _with_our_rope(attention_forward):
    @_ours("rope")
    @functools.wraps(attention_forward)
    def forward(self, *args, **kwargs):
        token = _OUR_ROPE.set(True)
        try:
            return attention_forward(self, *args, **kwargs)
        finally:
            _OUR_ROPE.reset(token)
    return forward


def _one_table(cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Do all sequences of the batch share positions? Ours takes one (seq, dim) table."""
    return cos.shape[0] == 1 or (torch.equal(cos, cos[:1].expand_as(cos))
                                 and torch.equal(sin, sin[:1].expand_as(sin)))


def _install_rope_switch(module) -> None:
    hf_rope = module.apply_rotary_pos_emb
    if getattr(hf_rope, "_mlpe", None):
        return

    @_ours("rope")
    @functools.wraps(hf_rope)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not (_OUR_ROPE.get() and unsqueeze_dim == 1 and q.dim() == 4 and cos.dim() == 3
                and _one_table(cos, sin)):
            return hf_rope(q, k, cos, sin, unsqueeze_dim)  # e.g. packed rows: HF's formula
        # HF: q, k (batch, heads, seq, dim), cos/sin (batch, seq, dim) holding each angle
        # twice (cat(freqs, freqs)); ours: (batch, seq, heads, dim) and (seq, dim / 2).
        half = q.shape[-1] // 2
        q, k = _rope(q.transpose(1, 2), k.transpose(1, 2), cos[0, :, :half], sin[0, :, :half])
        return q.transpose(1, 2), k.transpose(1, 2)

    module.apply_rotary_pos_emb = apply_rotary_pos_emb


def _fused_loss(hidden, head: nn.Linear, labels, num_items_in_batch=None, ignore_index=-100,
                shift_labels=None, **_):
    if shift_labels is None:
        # Token t predicts label t+1: shift the labels, not the hidden states (no copy).
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    x = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(x.device)
    weight, bias = head.weight, head.bias
    valid = int((targets != ignore_index).sum())
    if not valid:  # nothing to learn here: a zero that still reaches the head and the model
        return (x.sum() + weight.sum()).float() * 0.0
    if torch.is_autocast_enabled(x.device.type):  # what autocast would do to lm_head(x)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    loss = _linear_cross_entropy(x, weight, targets, bias, ignore_index)  # mean over valid
    if num_items_in_batch is not None:
        # Gradient accumulation: this micro-batch's sum over the whole batch's token count.
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss * valid / num_items_in_batch
    return loss


@_ours("fused_linear_cross_entropy")
@can_return_tuple
def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                       past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                       logits_to_keep=0, **kwargs):
    # The signature is HF's: the Trainer and generate() inspect it (loss kwargs,
    # logits_to_keep).
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    hidden = outputs.last_hidden_state[:, keep, :]
    logits = loss = None
    if labels is not None and self.training and type(self.lm_head) is nn.Linear:
        loss = _fused_loss(hidden, self.lm_head, labels, **kwargs)
    else:
        logits = self.lm_head(hidden)
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=logits,
                                  past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


# (flag, HF class suffix, kernel, forward given HF's): the four parts, in one table.
_PARTS = (
    ("rms_norm", "RMSNorm", "rmsnorm", lambda hf_forward: _rmsnorm_forward),
    ("swiglu", "MLP", "swiglu", lambda hf_forward: _swiglu_mlp_forward),
    ("rope", "Attention", "rope", _with_our_rope),  # wraps HF's attention forward
    ("fused_linear_cross_entropy", "ForCausalLM", "linear_cross_entropy",
     lambda hf_forward: _causal_lm_forward),
)


def _family(model_type):
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"apply_mlpe_kernels: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def apply_mlpe_kernels(model=None, *, model_type=None, rms_norm=True, swiglu=True, rope=True,
                       fused_linear_cross_entropy=True) -> list[str]:
    """Patch `model` (a llama, mistral, qwen2 or qwen3 PreTrainedModel) in place, or, with
    model_type only, that family's classes so that every model built after uses mlpe.kernels.
    Idempotent. Returns one line per part: what now runs on which kernel, or why a part was
    skipped. Raises ValueError for an unsupported model type."""
    if model is None and model_type is None:
        raise ValueError("apply_mlpe_kernels: pass a model, or a model_type to patch the "
                         "classes before a model is built")
    if model is not None:
        found = getattr(getattr(model, "config", None), "model_type", None)
        if found is None:
            raise ValueError(f"apply_mlpe_kernels: {type(model).__name__} has no "
                             "config.model_type: expected a transformers PreTrainedModel")
        if model_type is not None and model_type != found:
            raise ValueError(f"apply_mlpe_kernels: model_type={model_type!r} but the model "
                             f"is a {found!r}")
        model_type = found
    module = _family(model_type)
    wanted = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope,
              "fused_linear_cross_entropy": fused_linear_cross_entropy}
    done = []
    for flag, suffix, kernel, make_forward in _PARTS:
        if not wanted[flag]:
            continue
        cls = getattr(module, _CLASS_PREFIX[model_type] + suffix)
        if flag == "rope":
            _install_rope_switch(module)
        if model is None:
            done.append(_patch_class(cls, flag, kernel, make_forward))
        else:
            done.extend(_patch_instance(model, cls, flag, kernel, make_forward))
    for line in done:
        log.info("apply_mlpe_kernels(%s): %s", model_type, line)
    return done


def _patch_class(cls, flag, kernel, make_forward) -> str:
    if not getattr(cls.forward, "_mlpe", None):
        _CLASS_ORIGINALS.setdefault(cls, vars(cls).get("forward"))
        cls.forward = make_forward(cls.forward)
    note = " (silu models; others keep HF's MLP)" if flag == "swiglu" else ""
    return f"{flag}: {cls.__name__}.forward -> mlpe.kernels.{kernel}{note}"


def _patch_instance(model, cls, flag, kernel, make_forward) -> list[str]:
    found = [m for m in model.modules() if isinstance(m, cls)]
    lines = []
    if flag == "swiglu":
        other = sorted({type(m.act_fn).__name__ for m in found if not isinstance(m.act_fn, _SILU)})
        if other:
            lines.append(f"swiglu: skipped, hidden_act is not silu ({', '.join(other)}): "
                         f"HF's {cls.__name__} kept")
            log.warning("apply_mlpe_kernels: %s", lines[-1])
        found = [m for m in found if isinstance(m.act_fn, _SILU)]
    if not found:
        return lines or [f"{flag}: skipped, the model has no {cls.__name__}"]
    for m in found:
        if not getattr(m.forward, "_mlpe", None):  # already ours (instance or class): keep
            m.forward = types.MethodType(make_forward(type(m).forward), m)
    return [*lines, f"{flag}: {len(found)} {cls.__name__} -> mlpe.kernels.{kernel}"]


def _unpatch_classes() -> None:
    """Undo model_type patching (for tests; instances patched one by one keep theirs)."""
    while _CLASS_ORIGINALS:
        cls, forward = _CLASS_ORIGINALS.popitem()
        if forward is None:
            del cls.forward  # it was inherited
        else:
            cls.forward = forward
