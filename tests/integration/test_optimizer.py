"""mlpe optimizer end to end over gRPC: plans (cached in the real Redis), explanations,
validation errors, and AdviseJob reading a job's aggregates and alerts from the real
InfluxDB (written in the stream's line format)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import grpc
import pytest
import redis

from mlpe.common.grpc_server import wait_serving
from mlpe.common.jobs import resolve
from mlpe.common.process import free_port
from mlpe.v1 import control_pb2 as c
from mlpe.v1 import optimizer_pb2 as o
from mlpe.v1 import optimizer_pb2_grpc

NAMESPACE = f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def optimizer(stack_endpoints, tmp_path):
    port = free_port()
    env = {**os.environ, "MLPE_REDIS_URL": stack_endpoints.redis_url,
           "MLPE_INFLUX_URL": stack_endpoints.influx_url,
           "MLPE_INFLUX_TOKEN": stack_endpoints.influx_token,
           "MLPE_CONTROL_NAMESPACE": NAMESPACE}
    log = (tmp_path / "optimizer.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlpe.cli", "optimizer", "--listen",
                             f"127.0.0.1:{port}"], env=env, stdout=log, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    wait_serving(channel, proc, "mlpe optimizer",
                 log=lambda: (tmp_path / "optimizer.log").read_text())
    yield optimizer_pb2_grpc.OptimizerStub(channel)
    proc.terminate()
    proc.wait(30)
    channel.close()


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


def test_advise_job_reads_its_telemetry(optimizer, stack_endpoints):
    from influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS

    job = f"advise-{uuid.uuid4().hex[:8]}"
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
    with InfluxDBClient(url=stack_endpoints.influx_url, token=stack_endpoints.influx_token,
                        org=stack_endpoints.influx_org) as client:
        client.write_api(write_options=SYNCHRONOUS).write(
            stack_endpoints.influx_bucket, record="\n".join(lines))
    # The job as `mlpe control` records it: its spec lets the advice predict a gain.
    resolved, problems = resolve(c.JobSpec(steps=100, model=c.ModelSpec(preset="gpt-125m"),
                                           global_batch=32, micro_batch=4))
    assert not problems
    r = redis.Redis.from_url(stack_endpoints.redis_url)
    r.hset(f"{NAMESPACE}:job:{job}", "resolved", json.dumps(resolved))
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
