"""Training detectors on synthetic step streams: what fires, what must not."""

import math

import numpy as np
import pytest

from mlpe.stream.detectors import training
from mlpe.v1 import alerts_pb2 as al
from mlpe.v1.training_pb2 import TrainStep

T0 = 1_800_000_000 * 10**9
WORLD = 4


def steps(n: int, step_s: float = 0.5, start: int = 1, t0: float = 0.0, loss=None, slow=None,
          gap_after: dict | None = None):
    """Every rank's TrainStep for steps start..start+n-1; loss(step) and slow(step) (a
    step-time factor) shape faults; gap_after = {step: seconds of pause after it}."""
    t = t0
    for s in range(start, start + n):
        dt = step_s * (slow(s) if slow else 1.0) + (gap_after or {}).get(s - 1, 0.0)
        t += dt
        value = loss(s) if loss else 2.0 + 8.0 * math.exp(-s / 30)
        for rank in range(WORLD):
            yield TrainStep(job_id="job-1", rank=rank, world_size=WORLD, step=s,
                            time_ns=T0 + int(t * 1e9), loss=value + 0.01 * rank,
                            tokens_per_s=16384 / dt, step_time_s=dt)


def feed(messages, state=None):
    fired, alerts = [], []
    for msg in messages:
        state, found = training.step(state, msg, msg.time_ns)
        alerts += found
        fired += [(msg.step, a.rule) for a in found if a.state == al.ALERT_FIRING]
    return state, fired, alerts


def test_healthy_run_with_warmup_and_checkpoint_pauses_is_quiet():
    warm = lambda s: 2.0 if s < 10 else 1.0  # noqa: E731 - slow first steps
    _, fired, _ = feed(steps(300, slow=warm, gap_after={100: 20.0, 200: 25.0}))
    assert fired == []


def test_nan_loss_fires_at_once_then_resolves_after_quiet_steps():
    loss = lambda s: math.nan if s in (5, 9) else 3.0  # noqa: E731 - even during warm-up
    _, fired, alerts = feed(steps(40, loss=loss))
    assert fired == [(5, "training_loss_nonfinite")]
    assert [a.state for a in alerts] == [al.ALERT_FIRING, al.ALERT_RESOLVED]
    assert alerts[0].severity == al.SEVERITY_CRITICAL
    # Long enough to be notified: it clears QUIET_STEPS after the last NaN (step 9).
    assert alerts[1].ends_at_ns == next(m.time_ns for m in steps(40, loss=loss)
                                        if m.step == 9 + training.QUIET_STEPS + 1)


def test_loss_spike_after_warmup():
    loss = lambda s: 8.0 if 80 <= s < 83 else 2.0  # noqa: E731
    _, fired, _ = feed(steps(100, loss=loss))
    assert fired == [(80, "training_loss_spike")]


def test_throughput_regression_needs_a_sustained_drop():
    slow = lambda s: 1.5 if s >= 100 else 1.0  # noqa: E731
    _, fired, alerts = feed(steps(140, slow=slow))
    assert [r for _, r in fired] == ["training_throughput_regression"]
    assert 100 < fired[0][0] <= 108
    assert alerts[0].labels["job"] == "job-1"


def test_fast_steps_need_a_drop_held_for_seconds_not_just_steps():
    # 20 ms steps on shared cores: 10-step slow patches (0.4 s) come and go — no alert;
    # a drop held for 3 s (75 steps) is one alert, resolved once recovered for long enough.
    patches = lambda s: 1.6 if 200 <= s % 100 + 200 < 210 and s >= 200 else 1.0  # noqa: E731
    _, fired, _ = feed(steps(1000, step_s=0.02, slow=patches))
    assert fired == []
    held = lambda s: 1.6 if 500 <= s < 575 else 1.0  # noqa: E731
    _, fired, alerts = feed(steps(1000, step_s=0.02, slow=held))
    assert [r for _, r in fired] == ["training_throughput_regression"]
    assert fired[0][0] >= 500 + 1.5 / (0.02 * 1.6)  # not before 1.5 s of slow steps
    assert [a.state for a in alerts] == [al.ALERT_FIRING, al.ALERT_RESOLVED]


def test_replayed_steps_change_nothing():
    messages = list(steps(60))
    state, _, _ = feed(messages)
    again, fired, _ = feed(messages[-20:], state)
    assert again == state and fired == []


def test_stall_after_quiet_period_and_resolve_on_next_step():
    state, _, _ = feed(steps(50))
    last = state["t"]
    limit = training.stall_after_s(state)
    assert limit == training.STALL_MIN_S  # 20 steps of 0.5 s is less than the minimum
    assert training.stall_alert("job-1", state, last + int((limit - 1) * 1e9), False) is None
    alert = training.stall_alert("job-1", state, last + int((limit + 1) * 1e9), False)
    assert alert.state == al.ALERT_FIRING and alert.rule == "training_stalled"
    state, _, _ = feed(steps(1, start=51, t0=(last - T0) / 1e9 + limit + 5), state)
    resolved = training.stall_alert("job-1", state, state["t"], True)
    assert resolved.state == al.ALERT_RESOLVED and resolved.fingerprint == alert.fingerprint


def test_a_halted_job_is_no_stall_until_it_steps_again():
    state, _, _ = feed(steps(50))
    last, limit = state["t"], training.stall_after_s(state)
    paused = TrainStep(job_id="job-1", rank=0, world_size=WORLD, step=50, time_ns=last + 10**8,
                       halt="paused")
    state = training.halt(state, paused)
    much_later = last + int(10 * limit * 1e9)
    assert training.stall_alert("job-1", state, much_later, False) is None
    # A late step of another rank, from before the halt, does not end it ...
    state, _, _ = feed([TrainStep(job_id="job-1", rank=3, world_size=WORLD, step=50,
                                  time_ns=last, loss=2.0, tokens_per_s=1.0, step_time_s=0.5)],
                       state)
    assert state["halt"] == ["paused", last + 10**8]
    # ... a step after it does: from then on a silence is a stall again.
    state, _, _ = feed(steps(1, start=51, t0=(much_later - T0) / 1e9), state)
    assert state["halt"] is None
    alert = training.stall_alert("job-1", state, state["t"] + int((limit + 1) * 1e9), False)
    assert alert.state == al.ALERT_FIRING


def test_a_stalled_job_that_is_then_cancelled_resolves_its_stall():
    state, _, _ = feed(steps(50))
    state = training.halt(state, TrainStep(job_id="job-1", rank=0, world_size=WORLD, step=50,
                                           time_ns=state["t"] + 40 * 10**9, halt="stopped"))
    resolved = training.stall_alert("job-1", state, state["t"] + 41 * 10**9, True)
    assert resolved.state == al.ALERT_RESOLVED and resolved.summary == "Job job-1: stopped"
    assert training.halt(None, TrainStep(job_id="new", halt="paused")) is None


def test_a_30_s_pause_between_epochs_is_no_stall_even_when_its_next_step_arrives_late():
    state, _, _ = feed(steps(50))
    # The pause ends after 30 s; its next step reaches the stream a second later.
    assert training.stall_alert("job-1", state, state["t"] + 31 * 10**9, False) is None


def uneven(spread: float, seed: int = 7, then=None):
    """A step-time factor per step: batches of varying length (uniform ± spread), times
    then(step) when given (a fault on top)."""
    factors = 1.0 + spread * np.random.default_rng(seed).uniform(-1, 1, 100_000)
    return lambda s: factors[s] * (then(s) if then else 1.0)


@pytest.mark.parametrize("step_s", [0.1, 0.5, 2.0])
def test_uneven_steps_with_checkpoint_and_eval_pauses_are_quiet(step_s):
    n = int(600 / step_s)  # ten minutes of steps
    pauses = {n // 5: 20.0, n // 3: 8.0, n // 2: 25.0, 2 * n // 3: 3.0}
    _, fired, _ = feed(steps(n, step_s=step_s, slow=uneven(0.1), gap_after=pauses))
    assert fired == []


@pytest.mark.parametrize("factor", [1.18, 1.25, 1.43])  # 15, 20 and 30 % fewer tokens/s
def test_a_graded_regression_on_uneven_steps_is_found_within_seconds(factor):
    slow = uneven(0.05, then=lambda s: factor if 200 <= s < 230 else 1.0)
    _, fired, alerts = feed(steps(300, slow=slow))
    assert [r for _, r in fired] == ["training_throughput_regression"]
    onset_s = 199 * 0.5  # step 200 starts after 199 steps of ~0.5 s
    fired_s = (alerts[0].starts_at_ns - T0) / 1e9
    assert onset_s < fired_s and (fired[0][0] - 200) * 0.5 * factor < 6.0
    assert [a.state for a in alerts] == [al.ALERT_FIRING, al.ALERT_RESOLVED]


def test_a_run_of_long_steps_is_a_slowdown_not_a_pause():
    # The first step 3.5x longer could carry a pause; the next ones show it is the pace.
    _, fired, _ = feed(steps(200, slow=lambda s: 3.5 if s >= 150 else 1.0))
    assert [r for _, r in fired] == ["training_throughput_regression"]
    assert fired[0][0] <= 158


def test_regression_state_stays_json_plain_and_bounded():
    import json

    state, _, _ = feed(steps(400, step_s=0.02))
    assert json.loads(json.dumps(state)) == state
    assert len(state["tps"]["recent"]) <= 2.0 / 0.02 + 1
