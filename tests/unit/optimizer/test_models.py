"""Parameter counts of the presets against the published sizes, and the worker's GPT
counted exactly."""

import pytest

from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.models import MODELS, ModelShape, build_model, worker_model

# Published totals (model cards / papers), in parameters.
PUBLISHED = {
    "gpt2-small": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1558e6,
    "llama2-7b": 6.74e9, "llama2-13b": 13.02e9, "llama2-70b": 68.98e9,
    "llama3-8b": 8.03e9, "llama3-70b": 70.6e9, "llama3-405b": 405.9e9,
    "mixtral-8x7b": 46.7e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_the_published_sizes(name):
    assert MODELS[name].params() == pytest.approx(PUBLISHED[name], rel=0.02)


def test_gpt2_small_is_exact_and_mixtral_active_parameters():
    assert MODELS["gpt2-small"].params() == 124_439_808  # HF GPT2LMHeadModel, tied
    mixtral = MODELS["mixtral-8x7b"]
    assert mixtral.active_params() == pytest.approx(12.9e9, rel=0.02)
    assert MODELS["llama3-8b"].active_params() == MODELS["llama3-8b"].params()


def test_flops_per_token_convention():
    m = MODELS["llama3-8b"]
    n = m.params() - m.vocab * m.hidden  # the input embedding does no matmul
    assert m.matmul_params() == n
    assert m.flops_per_token(4096) == 6 * n + 12 * m.layers * m.hidden * 4096
    gpt2 = MODELS["gpt2-small"]  # tied: the table is the head and counts once
    assert gpt2.matmul_params() == gpt2.params() - 1024 * 768


WORKER_CONFIGS = [
    {},
    {"vocab": 256, "seq_len": 32, "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2},
    {"vocab": 1000, "seq_len": 64, "layers": 3, "hidden": 96, "heads": 6, "kv_heads": 1,
     "ffn": 200},
    {"vocab": 500, "seq_len": 16, "layers": 1, "hidden": 128, "heads": 8, "kv_heads": 8,
     "tied": True},
    {"vocab": 32000, "seq_len": 512, "layers": 2, "hidden": 384, "heads": 6, "kv_heads": 3},
]


@pytest.mark.parametrize("fields", WORKER_CONFIGS)
def test_worker_model_counts_the_gpt_exactly(fields):
    import torch  # noqa: F401 - only here: the library itself never imports torch

    from mlpe.worker.model import GPT, GPTConfig

    cfg = GPTConfig(**fields)
    model = GPT(cfg)
    assert worker_model(cfg).params() == sum(p.numel() for p in model.parameters())


def test_worker_presets():
    from mlpe.common.jobs import PRESETS

    for cfg in PRESETS.values():
        shape = worker_model(cfg)
        assert shape.ffn == cfg.ffn_size and shape.tied == cfg.tied


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"kv_heads": 5}, "model.kv_heads"),
    ({"heads": 30}, "model.heads"),
    ({"layers": -1}, "model.layers"),
    ({"hidden": 0}, "model.hidden"),
    ({"ffn_type": "relu"}, "model.ffn_type"),
    ({"top_k": 3}, "model.top_k"),
    ({"colour": 1}, "model.colour"),
])
def test_impossible_models_name_the_field(kwargs, field):
    with pytest.raises(PlanInputError) as err:
        build_model("llama3-8b", **kwargs)
    assert err.value.field == field
    assert err.value.reason


def test_unknown_preset_and_custom_models():
    with pytest.raises(PlanInputError) as err:
        build_model("llama9-1t")
    assert err.value.field == "model.preset"
    assert build_model("LLAMA3-8B") is MODELS["llama3-8b"]
    custom = build_model(None, layers=2, hidden=64, heads=4, kv_heads=4, ffn=128,
                         ffn_type="gelu", vocab=100, seq_len=32, tied=False)
    assert isinstance(custom, ModelShape) and custom.params() > 0
    with pytest.raises(PlanInputError) as err:
        build_model(None, layers=2)
    assert err.value.field.startswith("model.")


HF_CONFIGS = [
    ("llama", {"num_key_value_heads": 2}),
    ("mistral", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("qwen2", {"num_key_value_heads": 4}),  # q, k and v biases
    ("qwen3", {"num_key_value_heads": 2, "head_dim": 16}),  # q and k norms
    ("llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
]


@pytest.mark.parametrize(("model_type", "fields"), HF_CONFIGS)
def test_from_hf_config_counts_hugging_face_models_exactly(model_type, fields):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mlpe.optimizer.models import from_hf_config

    config = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=160, **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shape = from_hf_config(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert (shape.qkv_bias, shape.qk_norm) == (model_type == "qwen2", model_type == "qwen3")


def test_from_hf_config_refuses_what_it_cannot_model():
    from types import SimpleNamespace

    from mlpe.optimizer.models import from_hf_config

    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 160, "vocab_size": 300,
            "max_position_embeddings": 64}
    assert from_hf_config(SimpleNamespace(**base)).kv_heads == 4
    for change, field in (({"model_type": "gpt2"}, "model.model_type"),
                          ({"head_dim": 32}, "model.head_dim"),
                          ({"attention_bias": True}, "model.bias")):
        with pytest.raises(PlanInputError) as err:
            from_hf_config(SimpleNamespace(**{**base, **change}))
        assert err.value.field == field
