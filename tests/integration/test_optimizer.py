"""mlpe optimizer end to end over gRPC: plans (cached in the real Redis), explanations,
validation errors, and AdviseJob reading a job's aggregates and alerts from the real
InfluxDB (written in the stream's line format) and the job's spec from a real `mlpe
control` (GetJob)."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from mlpe.common import prices
from mlpe.common.grpc_server import wait_serving
from mlpe.common.settings import load as load_settings
from mlpe.control.local import LocalController
from mlpe.v1 import control_pb2 as c
from mlpe.v1 import optimizer_pb2 as o
from mlpe.v1 import optimizer_pb2_grpc
from tests.helpers import free_port, mlpe_env, start_mlpe, stop_child

NAMESPACE = f"test-{uuid.uuid4().hex[:8]}"


def start_optimizer(stack_endpoints, tmp_path, **env):
    port = free_port()
    log = tmp_path / "optimizer.log"
    proc = start_mlpe("optimizer", "--listen", f"127.0.0.1:{port}", log=log, env=mlpe_env(
        MLPE_REDIS_URL=stack_endpoints.redis_url, MLPE_INFLUX_URL=stack_endpoints.influx_url,
        MLPE_INFLUX_TOKEN=stack_endpoints.influx_token, MLPE_CONTROL_NAMESPACE=NAMESPACE,
        **env))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    wait_serving(channel, proc, "mlpe optimizer", log=log.read_text)
    return proc, channel


@pytest.fixture
def optimizer(stack_endpoints, tmp_path):
    proc, channel = start_optimizer(stack_endpoints, tmp_path)
    yield optimizer_pb2_grpc.OptimizerStub(channel)
    stop_child(proc)
    channel.close()


@pytest.fixture
def control_and_optimizer(stack_endpoints, tmp_path):
    """An `mlpe control` and an optimizer that asks it about jobs (MLPE_CONTROL_ADDRESS)."""
    control = LocalController(stack_endpoints.redis_url, stack_endpoints.kafka_bootstrap,
                              tmp_path / "control", slots=1, standby=0)
    control.start()
    proc, channel = start_optimizer(stack_endpoints, tmp_path,
                                    MLPE_CONTROL_ADDRESS=f"127.0.0.1:{control.port}")
    yield control, optimizer_pb2_grpc.OptimizerStub(channel)
    stop_child(proc)
    channel.close()
    control.stop()


def request(model="llama3-70b", cluster="16x8xH100", batch=1024, seq=8192, **training):
    return o.PlanRequest(model=o.ModelShape(preset=model), cluster=o.ClusterSpec(preset=cluster),
                         training=o.TrainingSpec(global_batch=batch, seq_len=seq, **training))


def test_plans_are_ranked_explained_and_cached(optimizer):
    first = optimizer.PlanTraining(request())
    assert first.plans and not first.cached
    best = first.plans[0]
    assert best.fits and best.dp * best.tp * best.pp * best.cp == 128
    assert best.memory.total_gib <= best.memory.capacity_gib == pytest.approx(80, abs=1)
    speeds = [p.tokens_per_s for p in first.plans]
    assert speeds == sorted(speeds, reverse=True)  # objective: throughput
    again = optimizer.PlanTraining(request())
    assert again.cached and again.plans[0] == best
    text = optimizer.ExplainPlan(o.ExplainPlanRequest(request=request(), plan=best)).text
    assert f"tp={best.tp}" in text or f"TP {best.tp}" in text or f"tp {best.tp}" in text


def test_impossible_and_infeasible_requests(optimizer):
    for bad, field in ((request(model="llama9-1t"), "model.preset"),
                       (request(cluster="0x8xH100"), "cluster"),
                       (request(batch=0), "training.global_batch"),
                       (o.PlanRequest(model=o.ModelShape(preset="llama3-8b", heads=30),
                                      cluster=o.ClusterSpec(preset="1x8xH100"),
                                      training=o.TrainingSpec(global_batch=8)), "model.")):
        with pytest.raises(grpc.RpcError) as err:
            optimizer.PlanTraining(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
    answer = optimizer.PlanTraining(request(model="llama3-405b", cluster="1x8xH100", batch=64))
    assert not answer.plans and answer.HasField("closest") and answer.suggestions
    assert not answer.closest.fits


def test_advise_job_reads_its_telemetry(control_and_optimizer, stack_endpoints):
    from influxdb_client.client.write_api import SYNCHRONOUS

    control, optimizer = control_and_optimizer
    # The job as `mlpe control` knows it: its spec lets the advice predict a gain. Only its
    # spec matters here, so it is cancelled at once (no need to train a 125M model).
    job = control.submit(c.JobSpec(steps=100, model=c.ModelSpec(preset="gpt-125m"),
                                   global_batch=32, micro_batch=4, device="cpu")).job_id
    control.stub.CancelJob(c.JobRequest(job_id=job), metadata=control.auth, timeout=10)
    now = time.time_ns()
    lines = []
    for i in range(6):  # a minute of 10 s windows
        t = now - (60 - 10 * i) * 10**9
        for gpu in range(2):
            lines.append(f"gpu,node={job}-n3,window=10s,gpu={gpu},job={job} util_mean=38.0,"
                         f"mem_used_mean=20000.0,mem_total_mean=81559.0,temp_max=65.0,"
                         f"throttle_reasons_max=0.0 {t}")
        lines.append(f"host,node={job}-n3,window=10s cpu_util_mean=97.0 {t}")
        lines.append(f"train,job={job},rank=0,window=10s tokens_per_s_mean=9000.0,"
                     f"step_time_s_mean=1.0,step_time_s_max=1.1 {t}")
    with stack_endpoints.influx() as client:
        client.write_api(write_options=SYNCHRONOUS).write(
            stack_endpoints.bucket_of("10s"), record="\n".join(lines))
    answer = optimizer.AdviseJob(o.AdviseJobRequest(job_id=job, window_s=300))
    titles = [r.title for r in answer.recommendations]
    assert titles[0].startswith("Input-bound"), titles
    assert "GPU util 38% while the CPU is 97% busy" in answer.recommendations[0].evidence
    headroom = next(x for x in answer.recommendations if x.title.startswith("Memory headroom"))
    assert "micro-batch 4 → 8 fits" in headroom.title and headroom.expected_gain_pct > 0
    assert "tokens/s" in headroom.evidence
    assert "2 GPUs on 1 nodes" in answer.summary
    unknown = optimizer.AdviseJob(o.AdviseJobRequest(job_id="no-such-job"))
    assert unknown.recommendations[0].title == "No telemetry for this job"
    with pytest.raises(grpc.RpcError) as err:
        optimizer.AdviseJob(o.AdviseJobRequest(job_id=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_named_layout_is_evaluated_over_grpc(optimizer):
    fits = optimizer.PlanTraining(o.PlanRequest(
        model=o.ModelShape(preset="llama3-70b"), cluster=o.ClusterSpec(preset="16x8xH100"),
        training=o.TrainingSpec(global_batch=1024, seq_len=8192),
        layout="tp8,pp4,zero1,mb1,recompute=selective"))
    [plan] = fits.plans
    assert (plan.tp, plan.pp, plan.dp, plan.grad_accum, plan.recompute) == \
        (8, 4, 4, 256, "selective")
    assert plan.fits and not fits.problems and plan.time.total_s == pytest.approx(
        plan.time.compute_s + plan.time.comm_exposed_s + plan.time.bubble_s)
    over = optimizer.PlanTraining(o.PlanRequest(
        model=o.ModelShape(preset="llama3-70b"), cluster=o.ClusterSpec(preset="16x8xH100"),
        training=o.TrainingSpec(global_batch=1024, seq_len=8192), layout="dp128"))
    assert not over.plans and not over.closest.fits
    assert over.problems[0].startswith("out of memory by") and len(over.nearest) == 3
    text = optimizer.ExplainPlan(o.ExplainPlanRequest(request=o.PlanRequest(
        model=o.ModelShape(preset="llama3-70b"), cluster=o.ClusterSpec(preset="16x8xH100"),
        training=o.TrainingSpec(global_batch=1024, seq_len=8192), layout="dp128"))).text
    assert "Cannot run:" in text and "out of memory by" in text
    with pytest.raises(grpc.RpcError) as err:
        optimizer.PlanTraining(o.PlanRequest(
            model=o.ModelShape(preset="llama3-70b"), cluster=o.ClusterSpec(preset="16x8xH100"),
            training=o.TrainingSpec(global_batch=1024), layout="tp8,pp=four"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "layout: part 'pp=four' is not understood" in err.value.details()


def test_plans_are_costed_and_cheapest_is_served(optimizer, stack_endpoints, tmp_path):
    fast = optimizer.PlanTraining(request(model="llama3-8b", cluster="4x8xH100", batch=256))
    best = fast.plans[0]
    hourly = prices.load(load_settings({}).prices_path).per_gpu_hour("h100")  # the shipped
    assert best.currency == "USD" and best.cost_per_step == pytest.approx(
        best.time.total_s * 32 * hourly / 3600)
    cheap = optimizer.PlanTraining(request(model="llama3-8b", cluster="4x8xH100", batch=256,
                                           objective="cheapest"))
    costs = [p.cost_per_billion_tokens for p in cheap.plans]
    assert costs == sorted(costs) and costs[0] <= best.cost_per_billion_tokens
    with pytest.raises(grpc.RpcError) as err:
        optimizer.PlanTraining(o.PlanRequest(
            model=o.ModelShape(preset="llama3-8b"),
            cluster=o.ClusterSpec(preset="1x8xH100", pricing="reserved"),
            training=o.TrainingSpec(global_batch=64)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("cluster.pricing: one of on_demand, spot")


def test_a_broken_price_table_stops_the_optimizer_at_start_naming_the_line(
        stack_endpoints, tmp_path):
    broken = tmp_path / "prices.yaml"
    broken.write_text("currency: USD\nsource: x\ndate: 2026-01-01\ngpus:\n  b300: "
                      "{on_demand: 9, spot: 4}\n")
    with pytest.raises(RuntimeError) as err:
        start_optimizer(stack_endpoints, tmp_path, MLPE_PRICES=str(broken))
    assert "optimizer exited (2)" in str(err.value)
    assert f"{broken}:5: unknown GPU type 'b300'" in str(err.value)
