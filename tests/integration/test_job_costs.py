"""What jobs cost, end to end on the real Redis and Kafka: a 2-rank job counted as 2 GPUs
(device "cuda", trained on the CPU by the example's --device), paused once and killed
once, whose useful / failure / paused split is checked against the times of its own
events, in GetJob, `mlpe jobs status` and on mlpe.events.cost; a budget that alerts at
80 % and 100 % on mlpe.alerts and pauses the job after a checkpoint; a budget that stops
one; bad budgets refused."""

from __future__ import annotations

import os
import signal
import uuid

import grpc
import pytest

from mlpe.common.alerts import CRITICAL, WARNING
from mlpe.common.topics import ALERTS, COST_EVENTS
from mlpe.control.local import LocalController
from mlpe.v1 import control_pb2 as c
from tests.helpers import REPO_ROOT, mlpe_env
from tests.helpers import mlpe as run_mlpe
from tests.integration.test_control import end_offsets, read_alerts, read_from

EXAMPLE = REPO_ROOT / "examples" / "train_mlp.py"
PRICE = 360.0  # per GPU-hour: 0.1 USD per GPU-second
PRICES = f"""currency: USD
source: "a test: 0.1 USD per GPU-second"
date: 2026-12-01
gpus:
  h100: {{on_demand: {PRICE}, spot: 1}}
"""
S = 1e9


@pytest.fixture
def control(stack_endpoints, tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    controller = LocalController(
        stack_endpoints.redis_url, stack_endpoints.kafka_bootstrap, tmp_path, slots=2,
        extra_env={"MLPE_CONTROL_SCRIPT_ROOTS": str(EXAMPLE.parent),
                   "MLPE_PRICES": str(prices), "MLPE_CONTROL_GPU_TYPE": "h100"})
    controller.start()
    yield controller
    controller.stop()


def submit(control, **fields) -> c.Job:
    """train_mlp.py on 2 ranks, counted as 2 GPUs (device cuda) but run on the CPU."""
    return control.submit(c.JobSpec(
        entrypoint=c.Entrypoint(script=str(EXAMPLE), args=["--steps", "100000", "--device",
                                                           "cpu"]),
        device="cuda", checkpoint=c.CheckpointPolicy(every_steps=5),
        **{"world_size": 2, **fields}))


def call(control, rpc: str, job_id: str) -> c.Job:
    return getattr(control.stub, rpc)(c.JobRequest(job_id=job_id), metadata=control.auth)


def wait_paused(control, job_id: str) -> dict:
    return control.wait("the ranks paused", lambda: all(
        p.get("state") == "paused" for p in control.progress(job_id).values()) and
        control.progress(job_id)[0])


def wait_event(control, job_id: str, kind: str, timeout: float = 120) -> c.JobEvent:
    return control.wait(f"a {kind} event", lambda: next(
        (e for e in control.events(job_id, live=False) if e.kind == kind), None), timeout)


def cost_events(bootstrap: str, mark: dict, job_id: str, until) -> list[c.JobCost]:
    """The job's JobCost messages on mlpe.events.cost after `mark`, until `until(them)`."""
    return read_from(bootstrap, mark, c.JobCost, lambda m: m.job_id == job_id, until)


def test_a_paused_and_killed_job_costs_what_its_events_say(control, stack_endpoints):
    mark = end_offsets(stack_endpoints.kafka_bootstrap, (COST_EVENTS,))
    job = submit(control, name="costed", max_restarts=2)
    control.wait_step(job.job_id, 0, 8)
    running = control.job(job.job_id).cost
    assert (running.gpus, running.gpu_type, running.price_per_gpu_hour, running.phase) == \
        (2, "h100-sxm", PRICE, "useful") and running.total > 0

    call(control, "PauseJob", job.job_id)
    paused = wait_paused(control, job.job_id)
    assert control.job(job.job_id).cost.phase == "paused"
    call(control, "ResumeJob", job.job_id)
    control.wait_step(job.job_id, 0, paused["step"] + 3)

    old = {p["pid"] for p in control.progress(job.job_id).values()}
    os.kill(control.progress(job.job_id)[1]["pid"], signal.SIGKILL)
    restart = wait_event(control, job.job_id, "restart")
    assert restart.cost.phase == "failure", str(restart)
    recovered = wait_event(control, job.job_id, "recovered")
    assert recovered.step >= restart.step and recovered.cost.phase == "useful"
    assert not old & {p["pid"] for p in control.progress(job.job_id).values()}
    control.wait_step(job.job_id, 0, recovered.step + 2)
    call(control, "CancelJob", job.job_id)

    events = control.events(job.job_id, live=False)
    states = [(e.state, e.time_ns) for e in events if e.kind == "state"]
    started = next(t for s, t in states if s == c.JOB_STATE_RUNNING)
    pause_at = next(t for s, t in states if s == c.JOB_STATE_PAUSED)
    resume_at = next(t for s, t in states if s == c.JOB_STATE_RUNNING and t > pause_at)
    ended = next(t for s, t in states if s == c.JOB_STATE_CANCELLED)
    cost = control.job(job.job_id).cost
    assert cost.phase == "" and cost.gpus == 2
    assert cost.paused_s == pytest.approx((resume_at - pause_at) / S, abs=1e-6)
    assert cost.failure_s == pytest.approx((recovered.time_ns - restart.time_ns) / S, abs=1e-6)
    assert cost.useful_s == pytest.approx(
        (ended - started) / S - cost.paused_s - cost.failure_s, abs=1e-6)
    assert cost.gpu_hours == pytest.approx((ended - started) / S * 2 / 3600, rel=1e-9)
    assert cost.total == pytest.approx((ended - started) / S * 2 * 0.1, rel=1e-9)
    assert cost.total == pytest.approx(cost.useful + cost.failure + cost.paused, rel=1e-9)
    final = next(e for e in events if e.kind == "state" and e.state == c.JOB_STATE_CANCELLED)
    assert final.cost == cost  # the final state event carries the final cost

    status = run_mlpe("jobs", "status", job.job_id, timeout=60, env=mlpe_env(
        MLPE_CONTROL_ADDRESS=f"127.0.0.1:{control.port}"))
    assert status.returncode == 0, status.stderr
    assert f"Cost: {cost.total:.4f} USD: useful {cost.useful:.4f}, failures " \
        f"{cost.failure:.4f}, paused {cost.paused:.4f} (" in status.stdout
    assert "2 x h100-sxm at 360 USD/GPU-hour on_demand" in status.stdout

    published = cost_events(stack_endpoints.kafka_bootstrap, mark, job.job_id,
                            lambda found: any(m.phase == "" for m in found))
    assert {m.phase for m in published} >= {"useful", "paused", "failure", ""}
    assert [m for m in published if m.phase == ""][-1] == cost


def test_a_budget_alerts_at_80_and_100_percent_and_pauses_after_a_checkpoint(
        control, stack_endpoints):
    mark = end_offsets(stack_endpoints.kafka_bootstrap, (ALERTS,))
    job = submit(control, name="budgeted", budget=c.Budget(amount=3))  # 15 s of 2 GPUs
    control.wait("the budget's pause", lambda: control.job(job.job_id).state ==
                 c.JOB_STATE_PAUSED, timeout=180)
    paused = wait_paused(control, job.job_id)
    assert paused["checkpoint_step"] == paused["step"] > 0  # saved, then paused
    control.wait("the checkpoint in the job", lambda: control.job(job.job_id).checkpoint_step
                 == paused["step"])
    budget = [e for e in control.events(job.job_id, live=False) if e.kind == "budget"]
    assert len(budget) == 2 and 2.4 <= budget[0].cost.total < 3 <= budget[1].cost.total
    assert budget[1].message.endswith("; checkpointed and paused (resume it to go on)")
    alerts = read_alerts(stack_endpoints.kafka_bootstrap, mark, job.job_id, "job_budget",
                         count=2)
    assert {a.labels["threshold"]: a.severity for a in alerts} == \
        {"80%": WARNING, "100%": CRITICAL}
    assert "of 3 USD" in alerts[-1].explanation
    # Resumed, it runs on: the budget is spent already and is not applied twice.
    call(control, "ResumeJob", job.job_id)
    control.wait_step(job.job_id, 0, paused["step"] + 3)
    assert control.job(job.job_id).state == c.JOB_STATE_RUNNING
    call(control, "CancelJob", job.job_id)


def test_a_stop_budget_cancels_and_bad_budgets_are_refused(control):
    job = submit(control, name="stopped", budget=c.Budget(amount=0.4, policy="stop"))
    control.wait("the budget's stop", lambda: control.job(job.job_id).state ==
                 c.JOB_STATE_CANCELLED, timeout=180)
    assert control.job(job.job_id).message.startswith("stopped: spent ")
    for budget, says in ((c.Budget(amount=-1), "budget.amount: between 0 (none) and"),
                         (c.Budget(amount=float("nan")), "budget.amount"),
                         (c.Budget(amount=5, policy="explode"),
                          "budget.policy: one of pause, stop, warn, got 'explode'")):
        with pytest.raises(grpc.RpcError) as err:
            submit(control, budget=budget)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert says in err.value.details()


def test_a_label_budget_adds_up_its_jobs_alerts_and_stops_them(stack_endpoints, tmp_path):
    team = f"t{uuid.uuid4().hex[:8]}"
    (tmp_path / "prices.yaml").write_text(PRICES)
    (tmp_path / "budgets.yaml").write_text(
        f"budgets:\n  - {{label: team={team}, amount: 1.2, policy: stop}}\n")
    control = LocalController(
        stack_endpoints.redis_url, stack_endpoints.kafka_bootstrap, tmp_path, slots=3,
        extra_env={"MLPE_CONTROL_SCRIPT_ROOTS": str(EXAMPLE.parent),
                   "MLPE_PRICES": str(tmp_path / "prices.yaml"),
                   "MLPE_BUDGETS": str(tmp_path / "budgets.yaml"),
                   "MLPE_CONTROL_GPU_TYPE": "h100"})
    control.start()
    try:
        mark = end_offsets(stack_endpoints.kafka_bootstrap, (ALERTS,))
        ours = [submit(control, world_size=1, labels={"team": team}) for _ in range(2)]
        other = submit(control, world_size=1, labels={"team": "someone-else"})
        for job in ours:  # 0.1 USD per GPU-second each: 1.2 USD in about 6 s together
            control.wait("the label budget's stop", lambda j=job: control.job(
                j.job_id).state == c.JOB_STATE_CANCELLED, timeout=180)
            assert control.job(job.job_id).message.startswith(
                "stopped: spent ") and f"of the team={team} budget 1.2 USD" in \
                control.job(job.job_id).message
        alerts = read_alerts(stack_endpoints.kafka_bootstrap, mark, "", "label_budget",
                             count=2, label=("label", f"team={team}"))
        assert {a.labels["threshold"]: a.severity for a in alerts} == \
            {"80%": WARNING, "100%": CRITICAL}
        assert all(j.job_id in alerts[-1].explanation for j in ours)
        assert control.job(other.job_id).state == c.JOB_STATE_RUNNING  # not its label
    finally:
        control.stop()
