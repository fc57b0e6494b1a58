"""mlpe.kernels.hf with the Triton kernels, run by Triton's interpreter: a tiny llama and a
tiny qwen3 (q_norm/k_norm) patched against HF's own, in training with labels (the fused LM
head + loss, also scaled by num_items_in_batch) and without (logits). The reference path of
the same patching: ../test_hf.py."""

import copy
import importlib.util

import pytest
import torch

from mlpe.kernels.dispatch import interpreting
from mlpe.kernels.tolerances import GRAD_TOLERANCES

TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 64, "initializer_range": 0.1}


def close(got, want, msg=None):
    atol, rtol = GRAD_TOLERANCES[torch.float32]  # fp32, summed in another order
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=msg)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_patched_model_runs_the_kernels_and_matches_hf(model_type):
    import transformers

    from mlpe.kernels.hf import apply_mlpe_kernels

    assert interpreting()
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **TINY)).train()
    ours = copy.deepcopy(ref)
    apply_mlpe_kernels(ours)
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    for num_items in (None, torch.tensor(40)):
        for model in (ref, ours):
            model.zero_grad(set_to_none=True)
        got = ours(input_ids=ids, labels=labels, num_items_in_batch=num_items)
        want = ref(input_ids=ids, labels=labels, num_items_in_batch=num_items)
        assert got.logits is None
        close(got.loss, want.loss)
        got.loss.backward()
        want.loss.backward()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
            close(p.grad, q.grad, msg=name)


# `pip install ./kernels` alone has no transformers: then there is nothing to patch and no
# test here (a skip would fail test_interpreted.py, which wants every test here to run).
if importlib.util.find_spec("transformers") is None:
    del test_patched_model_runs_the_kernels_and_matches_hf
