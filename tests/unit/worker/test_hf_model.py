"""The worker's Hugging Face model: from an inline config or a local pretrained folder,
patched with mlpe.kernels.hf or not, in training mode, with the GPT's interface."""

import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mlpe.worker.hf_model import HFCausalLM

TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 32}


def source(**fields) -> dict:
    return {"config": None, "config_path": "", "pretrained": "", "mlpe_kernels": True,
            **fields}


def test_a_pretrained_folder_loads_its_weights_in_training_mode(tmp_path):
    options = dict(TINY)
    saved = AutoModelForCausalLM.from_config(LlamaConfig(**{
        k: v for k, v in options.items() if k != "model_type"}))
    saved.save_pretrained(tmp_path / "m")
    model = HFCausalLM(source(pretrained=str(tmp_path / "m")))
    assert model.training and model.hf.training  # from_pretrained returns eval mode
    assert torch.equal(model.hf.model.embed_tokens.weight, saved.model.embed_tokens.weight)
    assert any("linear_cross_entropy" in line for line in model.patched)
    rows = torch.randint(0, 64, (2, 17))
    x, y = rows[:, :-1], rows[:, 1:]  # y is a non-contiguous view, as the worker's data
    loss = model(x, y)
    reference = torch.nn.functional.cross_entropy(saved(input_ids=x).logits.flatten(0, 1),
                                                  y.flatten())
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    assert model(x).shape == (2, 16, 64) and len(model.blocks) == 2


def test_an_inline_config_unpatched_and_a_config_file(tmp_path):
    plain = HFCausalLM(source(config=dict(TINY), mlpe_kernels=False))
    assert plain.patched == [] and plain.vocab == 64
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    from_file = HFCausalLM(source(config_path=str(tmp_path / "config.json")))
    assert from_file.hf.config.num_key_value_heads == 2 and from_file.patched
