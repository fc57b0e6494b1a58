"""A job's cost ledger: the useful / failure / paused split of a known timeline, what a job
is priced at, and the cost events the stream writes to InfluxDB."""

import math

import pytest

from mlpe.common.prices import Price, PriceTable
from mlpe.control.costs import FAILURE, PAUSED, USEFUL, Ledger, Pricer, phase_of, summary
from mlpe.stream.costs import cost_line
from mlpe.v1 import control_pb2 as c

S = 10**9
T0 = 1_800_000_000 * S  # 2027
TABLE = PriceTable("USD", "a test", "2026-12-01", {"h100-sxm": Price(7.2, 3.6)})


def test_a_job_with_one_kill_and_one_pause_splits_exactly():
    ledger = Ledger(gpus=8, gpu_type="h100-sxm", pricing="on_demand", price=7.2,
                    currency="USD")
    ledger.switch(phase_of(c.JOB_STATE_RUNNING, ledger), T0)          # launched
    ledger.catch_up_step = 120                                         # killed at step 120
    ledger.switch(phase_of(c.JOB_STATE_RUNNING, ledger), T0 + 100 * S)
    assert ledger.phase == FAILURE
    ledger.catch_up_step = 0                                           # back at step 120
    ledger.switch(phase_of(c.JOB_STATE_RUNNING, ledger), T0 + 130 * S)
    ledger.switch(phase_of(c.JOB_STATE_PAUSED, ledger), T0 + 200 * S)  # paused
    assert ledger.phase == PAUSED
    assert ledger.seconds(T0 + 230 * S) == {USEFUL: 170, FAILURE: 30, PAUSED: 30}
    ledger.switch(phase_of(c.JOB_STATE_RUNNING, ledger), T0 + 260 * S)  # resumed
    ledger.switch(phase_of(c.JOB_STATE_COMPLETED, ledger), T0 + 360 * S)
    assert ledger.phase == ""
    assert ledger.seconds(T0 + 10_000 * S) == {USEFUL: 270, FAILURE: 30, PAUSED: 60}
    cost = ledger.proto("job-1", "run", T0 + 10_000 * S, budget=10)
    assert cost.gpu_hours == pytest.approx(360 * 8 / 3600)
    assert (cost.useful, cost.failure, cost.paused) == pytest.approx((4.32, 0.48, 0.96))
    assert cost.total == pytest.approx(5.76) and cost.budget == 10
    assert Ledger.from_json(ledger.to_json()) == ledger
    assert summary(cost).startswith("5.7600 USD: useful 4.3200, failures 0.4800, paused "
                                    "0.9600 (0.800 GPU-hours of 8 x h100-sxm at 7.2 USD/")


def test_a_failure_while_paused_counts_as_failure_only_once_resumed():
    ledger = Ledger(2, "h100-sxm", "spot", 3.6, "USD")
    ledger.switch(phase_of(c.JOB_STATE_PAUSED, ledger), T0)
    ledger.catch_up_step = 50
    ledger.switch(phase_of(c.JOB_STATE_PAUSED, ledger), T0 + 5 * S)
    ledger.switch(phase_of(c.JOB_STATE_RUNNING, ledger), T0 + 10 * S)
    assert ledger.phase == FAILURE and ledger.seconds(T0 + 12 * S)[PAUSED] == 10


def test_what_a_job_is_priced_at():
    pricer = Pricer(TABLE, "h100-sxm", "spot", has_gpu=False)
    on_cuda, note = pricer.open({"device": "cuda", "world_size": 4})
    assert (on_cuda.gpus, on_cuda.price, on_cuda.gpu_type, note) == (4, 3.6, "h100-sxm", "")
    assert pricer.open({"device": "cpu", "world_size": 4})[0].gpus == 0
    assert pricer.open({"device": "auto", "world_size": 4})[0].gpus == 0  # no GPU here
    assert Pricer(TABLE, "h100-sxm", "spot", True).open(
        {"device": "auto", "world_size": 4})[0].gpus == 4
    unpriced, note = Pricer(TABLE, "a100-80gb", "on_demand", True).open(
        {"device": "cuda", "world_size": 1})
    assert unpriced.price == 0 and "no price for GPU 'a100-80gb'" in note
    unknown, note = Pricer(TABLE, "", "on_demand", False).open(
        {"device": "cuda", "world_size": 1})
    assert unknown.price == 0 and "MLPE_CONTROL_GPU_TYPE" in note
    cpu = Ledger(0, "", "on_demand", 0, "USD").proto("j", "", T0)
    assert summary(cpu) == "no GPU (CPU job): cost 0"


def _cost(**fields) -> bytes:
    base = dict(job_id="job-1", time_ns=T0, gpus=8, gpu_type="h100-sxm", pricing="spot",
                currency="USD", total=5.76, useful=4.32, failure=0.48, paused=0.96,
                useful_s=270, failure_s=30, paused_s=60, gpu_hours=0.8,
                price_per_gpu_hour=7.2)
    return c.JobCost(**{**base, **fields}).SerializeToString()


def test_a_cost_event_is_one_point_of_the_cost_measurement():
    line = cost_line(_cost(), now_ns=T0)
    head, fields, ts = line.split(" ")
    assert head == "cost,job=job-1,gpu_type=h100-sxm,pricing=spot,currency=USD"
    assert ts == str(T0) and "gpus=8i" in fields and "total=5.76" in fields
    assert "failure_s=30.0" in fields and "budget=0.0" in fields


@pytest.mark.parametrize("raw, says", [
    (b"\xff\x00garbage", "not a JobCost"),
    (_cost(job_id="a b,c=d"), "job 'a b,c=d' is not 1-128 characters"),
    (_cost(job_id=""), "job '' is not"),
    (_cost(currency="US\nD"), "currency"),
    (_cost(total=math.nan), "total=nan"),
    (_cost(paused=-1), "paused=-1.0"),
    (_cost(useful_s=math.inf), "useful_s=inf"),
    (_cost(gpus=-3), "gpus -3 is not in"),
    (_cost(time_ns=T0 + 2 * 86_400 * S), "not a plausible time"),
])
def test_a_malformed_cost_event_is_refused_with_its_reason(raw, says):
    with pytest.raises(ValueError) as err:
        cost_line(raw, now_ns=T0)
    assert says in str(err.value)
