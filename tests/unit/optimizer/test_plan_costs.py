"""What plans cost: the cheapest objective, the cost arithmetic against the price table, and
bad pricing named."""

import pytest

from mlpe.common.prices import Price, PriceTable
from mlpe.optimizer import service
from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.hardware import parse_cluster
from mlpe.optimizer.models import build_model
from mlpe.optimizer.planner import search
from mlpe.optimizer.search import Training
from mlpe.v1 import optimizer_pb2 as o

TABLE = PriceTable("EUR", "a test", "2026-12-01",
                   {"h100-sxm": Price(on_demand=4.0, spot=1.0)})


def request(objective="throughput", pricing="", cluster="4x8xH100", layout="", **model):
    return o.PlanRequest(
        model=o.ModelShape(preset="llama3-8b", **model),
        cluster=o.ClusterSpec(preset=cluster, pricing=pricing),
        training=o.TrainingSpec(global_batch=256, seq_len=8192, objective=objective),
        top_k=5, layout=layout)


def test_cheapest_is_the_most_tokens_per_gpu_on_any_gpu_count():
    model, cluster, training = build_model("llama3-8b"), parse_cluster("4x8xH100"), \
        Training(256, 8192)
    fast = search(model, cluster, training, "throughput", top_k=5)
    cheap = search(model, cluster, training, "cheapest", top_k=5)
    per_gpu = [p.tokens_per_s / p.gpus for p in cheap.plans]
    assert per_gpu == sorted(per_gpu, reverse=True) and len(cheap.plans) == 5
    assert per_gpu[0] >= fast.plans[0].tokens_per_s / fast.plans[0].gpus
    assert cheap.plans[0].gpus < cluster.world  # fewer GPUs waste less on communication
    assert {p.gpus for p in cheap.plans} <= {1, 2, 4, 8, 16, 32}


def test_cost_per_step_and_per_billion_tokens_follow_the_price():
    response = service.plan(request(), TABLE)
    assert response.plans
    for plan in response.plans:
        gpus = plan.dp * plan.tp * plan.pp * plan.cp
        assert plan.currency == "EUR"
        assert plan.cost_per_step == pytest.approx(plan.time.total_s * gpus * 4.0 / 3600)
        assert plan.cost_per_billion_tokens == pytest.approx(
            1e9 / plan.tokens_per_s * gpus * 4.0 / 3600)
    spot = service.plan(request(pricing="spot"), TABLE)
    assert spot.plans[0].cost_per_step == pytest.approx(response.plans[0].cost_per_step / 4)
    cheap = service.plan(request("cheapest"), TABLE)
    costs = [p.cost_per_billion_tokens for p in cheap.plans]
    assert costs == sorted(costs) and costs[0] <= response.plans[0].cost_per_billion_tokens


def test_a_named_layout_and_the_nearest_ones_are_costed():
    fits = service.plan(request(layout="dp8,zero2,mb1", cluster="1x8xH100"), TABLE)
    assert fits.plans[0].cost_per_step == pytest.approx(
        fits.plans[0].time.total_s * 8 * 4.0 / 3600)
    over = service.plan(request(layout="dp8,zero0,mb8", cluster="1x8xH100"), TABLE)
    assert not over.plans and over.closest.cost_per_step > 0
    assert all(p.cost_per_step > 0 and p.currency == "EUR" for p in over.nearest)


def test_bad_or_unpriced_pricing_is_an_input_error_naming_the_field():
    with pytest.raises(PlanInputError) as err:
        service.plan(request(pricing="reserved"), TABLE)
    assert err.value.field == "cluster.pricing"
    assert "one of on_demand, spot; got 'reserved'" in err.value.reason
    with pytest.raises(PlanInputError) as err:
        service.plan(request(cluster="1x8xA100"), TABLE)
    assert err.value.field == "prices"
    assert "no price for GPU 'a100-80gb'" in err.value.reason


def test_the_settings_price_table_is_used_and_a_broken_one_is_named(tmp_path, monkeypatch):
    path = tmp_path / "prices.yaml"
    path.write_text("currency: GBP\nsource: x\ndate: 2026-01-01\n"
                    "gpus:\n  h100: {on_demand: 3.6, spot: 1}\n")
    monkeypatch.setenv("MLPE_PRICES", str(path))
    plan = service.plan(request(cluster="1x8xH100")).plans[0]
    assert plan.currency == "GBP"
    assert plan.cost_per_step == pytest.approx(plan.time.total_s * 8 * 3.6 / 3600)
    path.write_text("currency: GBP\nsource: x\ndate: 2026-01-01\n"
                    "gpus:\n  h100: {on_demand: lots, spot: 1}\n")
    with pytest.raises(PlanInputError) as err:
        service.plan(request(cluster="1x8xH100"))
    assert err.value.field == "prices" and err.value.reason.startswith(f"{path}:5: h100:")
