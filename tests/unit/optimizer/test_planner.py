"""The planner: bubble, rejections, feasibility, objectives, validation, speed (printed)."""

import re

import pytest

from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.explain import explain
from mlpe.optimizer.hardware import GPUS, Cluster, parse_cluster
from mlpe.optimizer.models import build_model
from mlpe.optimizer.planner import search, search_latency_ms
from mlpe.optimizer.search import Plan, SearchResult, Training, build_training
from mlpe.optimizer.timing import bubble_fraction, plan_time


def test_bubble_formula():
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)  # (p-1)/(m+p-1)
    assert bubble_fraction(1, 8) == 0
    assert bubble_fraction(4, 12, 3) == pytest.approx(1 / 13)  # (p-1)/v / (m+(p-1)/v)
    # The step time's bubble has that share of the pipeline's busy + idle time.
    m = build_model("llama2-70b")
    cluster = parse_cluster("4x8xH100")
    t, _, _ = plan_time(m, cluster, 4096, 256, tp=8, pp=4, dp=1, micro_batch=1,
                        grad_accum=256, recompute="full")
    busy = t.compute_s + t.tp_comm_s
    assert t.bubble_s / (busy + t.bubble_s) == pytest.approx(bubble_fraction(4, 256))


def test_tp_that_does_not_divide_the_heads_is_rejected_by_name():
    cluster = Cluster(2, 6, GPUS["h100-sxm"])
    result = search(build_model("llama3-70b"), cluster, Training(96, 4096))
    reasons = [r.reason for r in result.rejected]
    assert "heads 64 not divisible by tp 3" in reasons
    assert "heads 64 not divisible by tp 6" in reasons
    assert all(p.tp in (1, 2) for p in result.plans)
    gpt2 = search(build_model("gpt2-small"), parse_cluster("1x8xA100"), Training(64, 1024))
    assert "heads 12 not divisible by tp 8" in [r.reason for r in gpt2.rejected]


def test_out_of_memory_rejection_message():
    result = search(build_model("llama2-70b"), parse_cluster("1x8xA100"), Training(64, 4096))
    ooms = [r for r in result.rejected if r.reason.startswith("out of memory")]
    assert ooms
    for r in ooms:
        match = re.fullmatch(r"out of memory by (\d+\.\d) GiB \(needs (\d+\.\d) of 80\)",
                             r.reason)
        assert match, r.reason
        assert float(match[2]) - float(match[1]) == pytest.approx(80, abs=0.11)
        assert {"tp", "pp", "cp", "dp"} <= set(r.layout)


def test_7b_on_8_a100_80gb_has_a_feasible_plan():
    model = build_model("llama2-7b")
    cluster = parse_cluster("1x8xA100-80GB")
    training = build_training(512, 4096)
    result = search(model, cluster, training)
    assert isinstance(result, SearchResult) and result.plans
    best = result.plans[0]
    assert isinstance(best, Plan) and best.fits
    assert best.memory.total <= 80 * 2**30
    assert best.dp * best.tp * best.pp * best.cp == 8
    assert best.micro_batch * best.grad_accum * best.dp == 512
    assert 0.2 < best.mfu < 0.7 and best.tokens_per_s > 0
    speeds = [p.tokens_per_s for p in result.plans]
    assert speeds == sorted(speeds, reverse=True)
    text = explain(best, model, cluster, training)
    print(text)
    for needle in ("Layout:", "Why:", "Memory per GPU", "Step time", "bubble", "MFU"):
        assert needle in text


def test_405b_on_one_h100_node_is_infeasible_with_closest_and_suggestions():
    result = search(build_model("llama3-405b"), parse_cluster("1x8xH100"),
                    Training(64, 8192))
    assert result.plans == []
    assert result.closest is not None and not result.closest.fits
    assert result.closest.overflow_bytes > 0
    text = "\n".join(result.suggestions)
    print(text)
    assert re.search(r"use at least \d+ nodes", text)
    assert any("offload" in s for s in result.suggestions)
    # The closest plan already recomputes everything, on as small a micro-batch as exists.
    assert result.closest.recompute == "full" and result.closest.micro_batch == 1


def test_fewest_gpus_versus_throughput():
    model, cluster = build_model("llama2-7b"), parse_cluster("4x8xA100")
    training = Training(512, 4096)
    fast = search(model, cluster, training, "throughput", top_k=5)
    few = search(model, cluster, training, "fewest_gpus", top_k=5)
    assert all(p.gpus == 32 for p in fast.plans)
    assert few.plans[0].gpus < fast.plans[0].gpus
    assert [p.gpus for p in few.plans] == sorted(p.gpus for p in few.plans)
    assert fast.plans[0].tokens_per_s > few.plans[0].tokens_per_s
    fit = search(model, cluster, training, "fit", top_k=5)
    assert fit.plans[0].memory.total <= fast.plans[0].memory.total


def test_offload_only_when_nothing_fits_without():
    result = search(build_model("llama2-13b"), parse_cluster("1x8xA100"), Training(64, 4096))
    assert result.plans and all(p.offload == "none" for p in result.plans)
    tight = search(build_model("llama2-13b"), parse_cluster("1x1xA100-40GB"),
                   Training(8, 2048))
    assert tight.plans and all(p.offload != "none" for p in tight.plans)
    assert any("offload" in s for s in tight.suggestions)


def test_moe_uses_expert_parallelism():
    result = search(build_model("mixtral-8x7b"), parse_cluster("4x8xH100"),
                    Training(256, 4096), top_k=20)
    assert result.plans
    assert any(p.ep > 1 for p in result.plans)


@pytest.mark.parametrize(("spec", "field"), [("0x8xH100", "cluster.nodes"),
                                             ("2x0xH100", "cluster.gpus_per_node"),
                                             ("2x8xTPUv5", "cluster.gpu"),
                                             ("lots of GPUs", "cluster")])
def test_bad_clusters_name_the_field(spec, field):
    with pytest.raises(PlanInputError) as err:
        parse_cluster(spec)
    assert err.value.field == field


def test_cluster_parsing():
    c = parse_cluster("16x8xH100")
    assert (c.nodes, c.gpus_per_node, c.gpu.name, c.world) == (16, 8, "h100-sxm", 128)
    assert parse_cluster("8xa100-40gb").gpu.memory_gib == 40
    assert parse_cluster("2x4xA100").gpu.name == "a100-80gb"
    assert parse_cluster("1x8xh200").gpu.memory_gib == 141
    assert c.inter_gbps == 50 and c.intra_gbps == 450


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"global_batch": 0, "seq_len": 1024}, "training.global_batch"),
    ({"global_batch": 8, "seq_len": -5}, "training.seq_len"),
    ({"global_batch": 8, "seq_len": 1024, "precision": "int4"}, "training.precision"),
    ({"global_batch": 8, "seq_len": 1024, "optimizer": "lion"}, "training.optimizer"),
])
def test_bad_training_names_the_field(kwargs, field):
    with pytest.raises(PlanInputError) as err:
        build_training(**kwargs)
    assert err.value.field == field


def test_fp8_on_a100_and_bad_objective_are_input_errors():
    with pytest.raises(PlanInputError) as err:
        search(build_model("llama3-8b"), parse_cluster("1x8xA100"),
               Training(64, 8192, precision="fp8"))
    assert err.value.field == "training.precision"
    with pytest.raises(PlanInputError) as err:
        search(build_model("llama3-8b"), parse_cluster("1x8xA100"), Training(64, 8192),
               objective="fastest")
    assert err.value.field == "objective"


def test_the_1024_gpu_search_finishes():
    result = search(build_model("llama3-70b"), parse_cluster("128x8xH100"),
                    Training(1024, 8192))
    assert result.plans and result.plans[0].gpus == 1024
    latency = search_latency_ms(5)
    print(f"\n1,024-GPU search: {result.evaluated} candidates, {result.elapsed_ms:.1f} ms; "
          f"p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms over 5")
    small = search_latency_ms(5, cluster="16x8xH100")
    print(f"128-GPU search: p50 {small['p50']:.1f} ms, p99 {small['p99']:.1f} ms")
