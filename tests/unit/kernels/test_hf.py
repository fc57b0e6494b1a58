"""mlpe.kernels.hf on tiny random Llama-family models (fp32 on the CPU: the PyTorch
references): patched and unpatched models agree on logits, loss, every gradient and a short
training run; both patch modes; gradient accumulation with num_items_in_batch. The Triton
kernels in the same models: interpreted/test_hf_interpreted.py."""

import collections
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")  # `pip install ./kernels` alone has none

from mlpe.kernels import hf  # noqa: E402
from mlpe.kernels.hf import SUPPORTED_MODEL_TYPES, apply_mlpe_kernels  # noqa: E402
from mlpe.kernels.tolerances import GRAD_TOLERANCES, TOLERANCES  # noqa: E402

VOCAB, LAYERS = 96, 2
TINY = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "max_position_embeddings": 64, "initializer_range": 0.1,
        "pad_token_id": 0}
PARTS = ["rms_norm", "swiglu", "rope", "fused_linear_cross_entropy"]


def tiny(model_type, **overrides):
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).train()


def batch(seed, rows=2, seq=12, ignored=(3, 0)):
    """Token ids and labels; the first `ignored[r]` labels of row r are -100 (a prompt)."""
    ids = torch.randint(1, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    for row, n in enumerate(ignored):
        labels[row, :n] = -100
    return ids, labels


def close(got, want, tolerances=TOLERANCES, msg=None):
    atol, rtol = tolerances[torch.float32]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=msg)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def close_grads(got: dict, want: dict):
    """Every parameter's gradient, by name."""
    assert got.keys() == want.keys()
    for name in want:
        close(got[name], want[name], GRAD_TOLERANCES, msg=name)


def sums(model, *args, **kwargs):
    """Loss and gradients of one forward and backward from zero gradients."""
    model.zero_grad(set_to_none=True)
    loss = model(*args, **kwargs).loss
    loss.backward()
    return loss.detach(), grads(model)


@pytest.fixture
def calls(monkeypatch):
    """How often each mlpe kernel ran (spies on the names hf.py calls)."""
    counts = collections.Counter()

    def spy(name, real):
        def counted(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return counted

    for name in ("_rmsnorm", "_swiglu", "_rope", "_linear_cross_entropy"):
        monkeypatch.setattr(hf, name, spy(name, getattr(hf, name)))
    return counts


@pytest.fixture
def class_patching():
    yield
    hf._unpatch_classes()


@pytest.mark.parametrize(("model_type", "overrides"),
                         [pytest.param(t, {}, id=t) for t in SUPPORTED_MODEL_TYPES]
                         + [pytest.param("qwen2", {"tie_word_embeddings": True},
                                         id="qwen2-tied")])
def test_patched_instance_matches_hf(model_type, overrides, calls):
    ref = tiny(model_type, **overrides)
    ours = copy.deepcopy(ref)
    replaced = apply_mlpe_kernels(ours)
    assert [line.split(":")[0] for line in replaced] == PARTS, replaced
    norms = 2 * LAYERS + 1 + (2 * LAYERS if model_type == "qwen3" else 0)  # q_norm, k_norm
    assert f"rms_norm: {norms} " in replaced[0]
    ids, labels = batch(1)

    close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert calls == {"_rmsnorm": norms, "_swiglu": LAYERS, "_rope": LAYERS}

    got, want = ours(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert got.logits is None  # training with labels: the logits were never made
    assert calls["_linear_cross_entropy"] == 1
    close(got.loss, want.loss)
    got.loss.backward()
    want.loss.backward()
    close_grads(grads(ours), grads(ref))


def test_eval_and_generation_compute_logits_as_hf_does(calls):
    ref = tiny("llama")
    ours = copy.deepcopy(ref)
    apply_mlpe_kernels(ours)
    ref.eval(), ours.eval()
    ids, labels = batch(2)
    got, want = ours(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    close(got.logits, want.logits)
    close(got.loss, want.loss)
    assert calls["_linear_cross_entropy"] == 0  # eval: HF's head and loss
    prompt = ids[:1, :5]
    settings = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(ours.generate(prompt, **settings), ref.generate(prompt, **settings))
    assert calls["_rope"] > 2 * LAYERS  # the cached decoding steps ran ours too
    # return_dict=False: a tuple, as HF's can_return_tuple makes it.
    ours.train()
    out = ours(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple)
    close(out[0], ref(input_ids=ids, labels=labels).loss)


def test_rope_falls_back_to_hf_when_positions_differ_across_the_batch(calls):
    ref = tiny("qwen3")
    ours = copy.deepcopy(ref)
    apply_mlpe_kernels(ours)
    ids, _ = batch(3)
    same = torch.arange(12).expand(2, 12)
    packed = torch.cat([torch.arange(12)[None], torch.arange(6).repeat(2)[None]])
    close(ours(input_ids=ids, position_ids=same).logits,
          ref(input_ids=ids, position_ids=same).logits)
    assert calls["_rope"] == LAYERS
    close(ours(input_ids=ids, position_ids=packed).logits,
          ref(input_ids=ids, position_ids=packed).logits)
    assert calls["_rope"] == LAYERS  # packed rows: HF's own formula


def test_gradient_checkpointing_recomputes_with_our_rope(calls):
    ref = tiny("llama")
    ours = copy.deepcopy(ref)
    apply_mlpe_kernels(ours)
    for model in (ref, ours):
        model.gradient_checkpointing_enable()
    ids, labels = batch(4)
    close(sums(ours, input_ids=ids, labels=labels)[0], sums(ref, input_ids=ids, labels=labels)[0])
    close_grads(grads(ours), grads(ref))
    assert calls["_rope"] == 2 * LAYERS  # forward, and again in the recomputation


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_patching_the_classes_before_construction(model_type, calls, class_patching):
    ids, labels = batch(5)
    ref = tiny(model_type)
    want_logits = ref(input_ids=ids).logits.detach()
    want_loss, want_grads = sums(ref, input_ids=ids, labels=labels)
    del ref  # built from HF's classes, which are about to change

    replaced = apply_mlpe_kernels(model_type=model_type)
    prefix = hf._CLASS_PREFIX[model_type]
    assert replaced[0] == f"rms_norm: {prefix}RMSNorm.forward -> mlpe.kernels.rmsnorm"
    assert [line.split(":")[0] for line in replaced] == PARTS
    assert apply_mlpe_kernels(model_type=model_type) == replaced  # idempotent
    ours = tiny(model_type)
    assert not any("forward" in vars(m) for m in ours.modules())  # the classes run ours
    assert apply_mlpe_kernels(ours)  # instance patching on top: a no-op
    assert not any("forward" in vars(m) for m in ours.modules())

    close(ours(input_ids=ids).logits, want_logits)
    loss, got_grads = sums(ours, input_ids=ids, labels=labels)
    close(loss, want_loss)
    close_grads(got_grads, want_grads)
    assert set(calls) == {"_rmsnorm", "_swiglu", "_rope", "_linear_cross_entropy"}


def test_class_patching_keeps_hf_mlp_for_other_activations(calls, class_patching):
    ref = tiny("llama", hidden_act="gelu")
    ids, labels = batch(6)
    want = sums(ref, input_ids=ids, labels=labels)[0]
    apply_mlpe_kernels(model_type="llama")
    close(sums(tiny("llama", hidden_act="gelu"), input_ids=ids, labels=labels)[0], want)
    assert calls["_swiglu"] == 0 and calls["_rmsnorm"] > 0


def test_instance_patching_is_idempotent_and_stays_in_its_instance(calls):
    ref = tiny("llama")
    ours, other = copy.deepcopy(ref), copy.deepcopy(ref)
    first = apply_mlpe_kernels(ours)
    forwards = {name: vars(m).get("forward") for name, m in ours.named_modules()}
    assert apply_mlpe_kernels(ours) == first
    assert forwards == {name: vars(m).get("forward") for name, m in ours.named_modules()}
    assert all(f is None or f.__func__._mlpe for f in forwards.values())
    ids, labels = batch(7)
    close(sums(ours, input_ids=ids, labels=labels)[0], sums(ref, input_ids=ids, labels=labels)[0])
    close_grads(grads(ours), grads(ref))

    calls.clear()
    later = tiny("llama")  # built after: HF's classes, untouched
    for model in (other, later, ref):
        assert not any("forward" in vars(m) for m in model.modules())
        model(input_ids=ids, labels=labels).loss.backward()
    assert not calls  # none of ours ran outside the patched instance


def test_parts_can_be_left_out_and_other_activations_keep_hf_mlp(calls):
    ref = tiny("mistral", hidden_act="gelu")
    ours = copy.deepcopy(ref)
    replaced = apply_mlpe_kernels(ours, rope=False, fused_linear_cross_entropy=False)
    assert [line.split(":")[0] for line in replaced] == ["rms_norm", "swiglu"]
    assert replaced[1].startswith("swiglu: skipped, hidden_act is not silu")
    assert all("forward" not in vars(m) for m in ours.modules()
               if not isinstance(m, transformers.models.mistral.modeling_mistral.MistralRMSNorm))
    ids, labels = batch(8)
    got = ours(input_ids=ids, labels=labels)
    assert got.logits is not None
    close(got.loss, ref(input_ids=ids, labels=labels).loss)
    assert set(calls) == {"_rmsnorm"}
    assert apply_mlpe_kernels(ours, rms_norm=False, swiglu=False, rope=False,
                              fused_linear_cross_entropy=False) == []


def test_unsupported_models_are_refused_by_name():
    with pytest.raises(ValueError, match=r"'gpt2' is not supported .*llama, mistral"):
        apply_mlpe_kernels(model_type="gpt2")
    with pytest.raises(ValueError, match="pass a model, or a model_type"):
        apply_mlpe_kernels()
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        apply_mlpe_kernels(gpt2)
    with pytest.raises(ValueError, match="model_type='qwen2' but the model is a 'llama'"):
        apply_mlpe_kernels(tiny("llama"), model_type="qwen2")
    with pytest.raises(ValueError, match=r"Linear has no config\.model_type"):
        apply_mlpe_kernels(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_twenty_adamw_steps_follow_the_same_loss_curve(model_type):
    ref = tiny(model_type)
    ours = copy.deepcopy(ref)
    apply_mlpe_kernels(ours)
    ids, labels = batch(9, rows=4, ignored=(3, 0, 5, 1))
    curves = []
    for model in (ref, ours):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        curve = []
        for _ in range(20):
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    close(curves[1], curves[0], GRAD_TOLERANCES)
    assert curves[1][-1] < 0.7 * curves[1][0]  # it did learn the batch


def test_gradient_accumulation_with_num_items_in_batch_equals_one_big_batch():
    ref = tiny("llama")
    ours = copy.deepcopy(ref)
    apply_mlpe_kernels(ours)
    micro = [batch(10, ignored=(1, 0)), batch(11, ignored=(9, 10))]
    counted = [int((labels[:, 1:] != -100).sum()) for _, labels in micro]  # after the shift
    assert counted == [22, 5]
    items = torch.tensor(sum(counted))  # what the Trainer passes: the whole batch's count
    big_loss, big_grads = sums(ours, input_ids=torch.cat([i for i, _ in micro]),
                               labels=torch.cat([labels for _, labels in micro]))
    for model in (ours, ref):
        model.zero_grad(set_to_none=True)
        losses = []
        for ids, labels in micro:
            loss = model(input_ids=ids, labels=labels, num_items_in_batch=items).loss
            loss.backward()  # accumulated
            losses.append(loss.detach())
        close(sum(losses), big_loss)
        close_grads(grads(model), big_grads)
    # The trap this avoids: the mean of the micro-batch means weighs the 5 tokens as the 22.
    means = [sums(ours, input_ids=i, labels=labels)[0] for i, labels in micro]
    assert abs(sum(means) / 2 - big_loss) > 1e-3


def test_a_micro_batch_with_every_label_ignored_adds_nothing():
    ref = tiny("qwen3")
    ours = copy.deepcopy(ref)
    apply_mlpe_kernels(ours)
    ids, labels = batch(12)
    empty_ids, empty = batch(13, ignored=(12, 12))
    items = torch.tensor(int((labels[:, 1:] != -100).sum()))
    for num_items in (items, None):
        loss, zero_grads = sums(ours, input_ids=empty_ids, labels=empty,
                                num_items_in_batch=num_items)
        assert loss.item() == 0.0  # finite: HF gives NaN here without num_items_in_batch
        assert all(torch.count_nonzero(g) == 0 for g in zero_grads.values())
    want_loss, want = sums(ref, input_ids=ids, labels=labels, num_items_in_batch=items)
    ours.zero_grad(set_to_none=True)
    total = 0.0
    for i, lab in ((ids, labels), (empty_ids, empty)):
        loss = ours(input_ids=i, labels=lab, num_items_in_batch=items).loss
        loss.backward()
        total += loss.item()
    close(torch.tensor(total), want_loss)
    close_grads(grads(ours), want)


def test_autocast_bf16_matches_hf_within_bf16_tolerance():
    ref = tiny("llama")
    ours = copy.deepcopy(ref)
    apply_mlpe_kernels(ours)
    ids, labels = batch(14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    atol, rtol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(got.loss, want.loss, atol=atol, rtol=rtol)
