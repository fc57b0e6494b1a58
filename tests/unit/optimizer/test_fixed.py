"""A layout the user names (`mlpe plan --layout`): parsed, checked and evaluated with the
search's own formulas, or refused with every reason and the nearest layouts that run."""

import pytest

from mlpe.optimizer import fixed
from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.hardware import parse_cluster
from mlpe.optimizer.models import build_model
from mlpe.optimizer.planner import search
from mlpe.optimizer.search import build_training
from mlpe.optimizer.timing import plan_time

MODEL = build_model("llama3-70b")
CLUSTER = parse_cluster("16x8xH100")
TRAINING = build_training(1024, 8192)


def verdict(text: str, model=MODEL, cluster=CLUSTER, training=TRAINING) -> fixed.Verdict:
    return fixed.evaluate(model, cluster, training, fixed.parse_layout(text))


def test_every_part_is_read():
    assert fixed.parse_layout("TP8, pp16,dp128,vpp2,cp2,ep4,zero1,mb1,ga16,sp,"
                              "schedule=interleaved,recompute=selective,offload=optimizer") == {
        "tp": 8, "pp": 16, "dp": 128, "virtual_stages": 2, "cp": 2, "ep": 4, "zero_stage": 1,
        "micro_batch": 1, "grad_accum": 16, "sp": True, "schedule": "interleaved",
        "recompute": "selective", "offload": "optimizer"}
    assert fixed.parse_layout("fsdp,tp=2") == {"zero_stage": 3, "tp": 2}


@pytest.mark.parametrize("text, named", [
    ("", "empty"), ("tp8,,pp2", "empty part"), ("tp8,tpx", "'tpx' is not understood"),
    ("tp8,tp4", "'tp4': tp is given twice"), ("zero4", "'zero4': ZeRO stages are 0-3"),
    ("recompute=most", "recompute must be one of none, selective, full"),
    ("pp0", "'pp0': must be ≥ 1"), ("tp8;pp2", "'tp8;pp2' is not understood"),
    ("tp99999999", "too large"), ("x" * 501, "at most 500"),
])
def test_a_bad_string_names_the_part_that_is_wrong(text, named):
    with pytest.raises(PlanInputError, match=named) as err:
        fixed.parse_layout(text)
    assert err.value.field == "layout"


def test_a_fitting_layout_gets_the_searchs_own_figures():
    best = search(MODEL, CLUSTER, TRAINING).plans[0]
    text = (f"tp{best.tp},pp{best.pp},cp{best.cp},dp{best.dp},vpp{best.virtual_stages},"
            f"zero{best.zero_stage},mb{best.micro_batch},recompute={best.recompute}")
    answer = verdict(text)
    assert answer.runs and not answer.problems and not answer.nearest
    assert answer.plan.grad_accum == best.grad_accum  # from the batch
    assert answer.plan.memory == best.memory and answer.plan.time == best.time
    assert answer.plan.tokens_per_s == pytest.approx(best.tokens_per_s)
    assert answer.plan.mfu == pytest.approx(best.mfu)


def test_a_layout_left_partly_out_is_completed():
    answer = verdict("tp8,pp4,ga32,zero1")
    # dp: the GPUs left over; mb: the batch per replica over its micro-batches.
    assert (answer.plan.dp, answer.plan.micro_batch, answer.plan.grad_accum) == (4, 8, 32)
    time, _, _ = plan_time(MODEL, CLUSTER, 8192, 1024, layout=answer.plan.replace())
    assert answer.plan.time.total_s == pytest.approx(time.total_s)


def test_a_layout_that_does_not_fit_says_by_how_much_and_what_would():
    answer = verdict("tp1,pp1,dp128,mb1")  # 70B unsharded on each GPU
    assert not answer.runs and not answer.plan.fits
    over = answer.plan.memory.total / 2**30 - 80
    assert over > 500
    [problem] = answer.problems
    assert problem.startswith(f"out of memory by {over:.1f} GiB per GPU (needs "
                              f"{answer.plan.memory.total / 2**30:.1f} of 80)")
    assert len(answer.nearest) == fixed.NEAREST
    assert all(p.fits for p in answer.nearest)
    distances = [fixed.distance(answer.plan, p) for p in answer.nearest]
    assert distances == sorted(distances)


def test_every_reason_is_given_at_once():
    answer = verdict("tp16,pp3,vpp4,cp3,ep2,offload=params,schedule=1f1b,mb4",
                     cluster=parse_cluster("18x8xH100"))
    text = " | ".join(answer.problems)
    for reason in ("kv_heads 8 not divisible by tp 16",
                   "schedule=1f1b and vpp4 disagree",
                   "sequence length 8192 not divisible by 2 x cp 3",
                   "ep 2 needs a mixture-of-experts model", "offload=params needs ZeRO-3"):
        assert reason in text, text
    assert not answer.runs


@pytest.mark.parametrize("text, reason", [
    ("tp8,pp4,dp8", "tp8 x pp4 x cp1 x dp8 = 256 GPUs; the cluster (16x8xh100-sxm) has 128"),
    ("tp8,pp3", "tp8 x pp3 x cp1 = 24 GPUs does not divide the cluster's 128"),
    ("tp8,pp4,mb3", "micro-batch 3 does not divide the 256 sequences per data-parallel"),
    ("tp8,pp4,mb4,ga4", "mb4 x ga4 x dp4 = 64 sequences; the global batch is 1024"),
])
def test_sizes_that_make_no_layout_of_this_cluster_and_batch(text, reason):
    answer = verdict(text)
    assert answer.plan is None and len(answer.problems) == 1
    assert answer.problems[0].startswith(reason)
    assert answer.nearest and all(p.fits for p in answer.nearest)


def test_nothing_fits_anywhere_gives_no_nearest():
    answer = verdict("tp8", model=build_model("llama3-405b"), cluster=parse_cluster("1x8xH100"),
                     training=build_training(8, 8192))
    assert not answer.runs and answer.nearest == []
    assert answer.problems[0].startswith("out of memory by")


def test_uneven_stages_are_allowed_up_to_the_searchs_imbalance():
    # Llama 3 405B: 126 layers in 16 stages of 2 chunks (1.6 % over); 80 in 32 stages is 20 %.
    llama = verdict("tp8,pp16,vpp2,mb1,zero1,recompute=full", model=build_model(
        "llama3-405b"), cluster=parse_cluster("256x8xH100"), training=build_training(512, 8192))
    assert llama.runs, llama.problems
    problems = verdict("tp4,pp32,vpp2,mb1").problems
    assert "layers 80 not divisible by pp 32 (stages of 3 layers: over 10% imbalance)" in \
        problems
    assert any(p.startswith("layers 80 not divisible by pp 32 x vpp 2 (chunks of 2") for p in
               problems)
