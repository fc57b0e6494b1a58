"""The simulated training job: reproducible step events, benign look-alikes and every fault."""

import argparse
import itertools
import math

import numpy as np
import pytest

from mlpe.agent.agent import Agent, train_step_records
from mlpe.agent.main import build, register
from mlpe.agent.scenario import ScenarioError, parse
from mlpe.agent.sources.sim import SimulatedGpus
from mlpe.agent.sources.train_sim import SimulatedTraining
from mlpe.common.settings import load as load_settings
from mlpe.common.topics import TRAIN_EVENTS
from mlpe.v1 import training_pb2

HZ = 100
EPOCH_NS = 1_700_000_000 * 10**9
PLAIN = "gpus_per_node: 2\ntraining: {warmup_s: 0}\n"


def times(k0: int, k1: int) -> np.ndarray:
    return EPOCH_NS + np.arange(k0, k1, dtype=np.int64) * (10**9 // HZ)


def run(text: str, seconds: float, block: int | None = None, **kwargs):
    """Every event of the first `seconds`, read `block` samples at a time (default: all)."""
    sim = SimulatedTraining(parse(text), HZ, **kwargs)
    end = round(seconds * HZ)
    block = block or end
    events = []
    for k0 in range(0, end, block):
        k1 = min(end, k0 + block)
        events += sim.steps_between(k0, k1, times(k0, k1))
    return events


def rank0(events):
    return [e for e in events if e.rank == 0]


def end_s(event) -> float:
    return (event.time_ns - EPOCH_NS) / 1e9


def wire(events):
    return [e.SerializeToString() for e in events]


# -- reproducibility ---------------------------------------------------------------------
def test_same_seed_same_events_other_seed_differs():
    text = "seed: 3\nnodes: 2\ngpus_per_node: 2\n"
    assert wire(run(text, 15)) == wire(run(text, 15))
    other = run(text.replace("seed: 3", "seed: 4"), 15)
    assert [e.loss for e in other] != [e.loss for e in run(text, 15)]


@pytest.mark.parametrize("block", [1, 7, 10, 333])
def test_same_events_however_time_is_sliced(block):
    text = (PLAIN.replace("warmup_s: 0", "warmup_s: 3, idle_gaps: [{at_s: 5, for_s: 1.23}]")
            + "faults:\n  - {kind: straggler, gpu: 1, at_s: 2.07, for_s: 1.5}\n"
            "  - {kind: slow_steps, at_s: 7.3, for_s: 2}\n"
            "  - {kind: stall, at_s: 10.01, for_s: 0.7}\n"
            "  - {kind: nan_loss, at_s: 11}\n  - {kind: loss_spike, at_s: 12, for_s: 1}")
    whole = run(text, 15)
    assert len(whole) > 40
    assert wire(run(text, 15, block=block)) == wire(whole)


def test_asking_about_the_past_again_replays_it():
    sim = SimulatedTraining(parse(PLAIN), HZ)
    first = sim.steps_between(0, 300, times(0, 300))
    sim.steps_between(300, 600, times(300, 600))
    assert wire(sim.steps_between(0, 300, times(0, 300))) == wire(first)
    assert wire(sim.steps_between(150, 300, times(150, 300))) == \
        wire([e for e in first if e.time_ns >= times(150, 151)[0]])


# -- the steady job ----------------------------------------------------------------------
def test_steps_end_at_multiples_of_the_step_time_one_event_per_rank():
    events = run("nodes: 2\ngpus_per_node: 4\ntraining: {warmup_s: 0, step_time_s: 0.5}", 10.01)
    steps = rank0(events)
    assert [e.step for e in steps] == list(range(1, 21))          # 10 s / 0.5 s
    assert [end_s(e) for e in steps] == pytest.approx([0.5 * n for n in range(1, 21)])
    assert len(events) == 8 * 20
    assert [e.rank for e in events[:8]] == list(range(8))
    e = events[5]                                                # node 1, GPU 1
    assert (e.world_size, e.node_id, e.gpu_index, e.job_id) == (8, "sim-node-01", 1, "sim-job")
    for e in events:
        assert e.step_time_s == pytest.approx(0.5, rel=0.02)
        assert e.tokens_per_s == pytest.approx(16384 / e.step_time_s)
        assert 0 < e.mem_allocated_bytes < e.mem_reserved_bytes < 80 << 30
        assert e.micro_batches == 1 and 0.5 < e.grad_norm < 1.5


def test_ranks_match_the_simulated_gpus():
    scenario = parse("nodes: 3\ngpus_per_node: 4")
    gpus = SimulatedGpus(scenario, HZ, node_prefix="rack1-")
    job = SimulatedTraining(scenario, HZ, node_prefix="rack1-")
    events = job.steps_between(0, 2000, times(0, 2000))[:12]
    assert [(e.node_id, e.gpu_index) for e in events] == \
        [(d.node_id, d.index) for d in gpus.devices]


def test_loss_decays_and_learning_rate_warms_up():
    steps = rank0(run(PLAIN + "training: {warmup_s: 0, step_time_s: 0.1, loss_start: 8}", 200))
    assert steps[0].loss == pytest.approx(8.0, rel=0.05)
    assert 1.9 < steps[-1].loss < 2.3
    assert steps[0].learning_rate < steps[-1].learning_rate == steps[200].learning_rate


def test_job_id_from_the_scenario_or_unique_per_node_prefix():
    assert SimulatedTraining(parse(""), HZ).job_id == "sim-job"
    assert SimulatedTraining(parse(""), HZ, node_prefix="rack1-").job_id == "rack1-job"
    named = SimulatedTraining(parse("training: {job_id: llama-7b}"), HZ, node_prefix="rack1-")
    assert named.job_id == "llama-7b"


# -- benign look-alikes --------------------------------------------------------------------
def test_warmup_steps_are_longer_then_normal():
    steps = rank0(run(PLAIN.replace("warmup_s: 0", "warmup_s: 10"), 20))
    assert steps[0].step_time_s == pytest.approx(1.0, rel=0.1)    # about twice as long
    assert all(a.step_time_s > b.step_time_s * 0.99 for a, b in itertools.pairwise(steps[:10]))
    assert all(e.step_time_s == pytest.approx(0.5, rel=0.02) for e in steps if end_s(e) > 11)


def test_no_step_ends_in_an_idle_gap_and_the_next_one_carries_it():
    steps = rank0(run(PLAIN.replace("warmup_s: 0", "warmup_s: 0, idle_gaps: "
                                                   "[{at_s: 5.2, for_s: 3}]"), 12))
    assert not [e for e in steps if 5.2 < end_s(e) < 8.2]
    after = next(e for e in steps if end_s(e) >= 8.2)
    assert after.step_time_s == pytest.approx(0.5 + 3, rel=0.01)
    assert after.tokens_per_s == pytest.approx(16384 / 3.5, rel=0.01)


# -- faults ----------------------------------------------------------------------------------
def with_faults(*faults: str) -> str:
    return PLAIN + "faults:\n" + "".join(f"  - {f}\n" for f in faults)


def test_nan_loss_without_for_s_is_one_step_on_every_rank():
    events = run(with_faults("{kind: nan_loss, at_s: 3.2}"), 8)
    nan_steps = {e.step for e in events if math.isnan(e.loss)}
    assert nan_steps == {7}                                      # the one ending at 3.5 s
    assert sum(math.isnan(e.loss) for e in events) == 2          # both ranks
    assert not any(math.isnan(e.loss) for e in events if e.step != 7)


def test_nan_loss_over_a_window():
    steps = rank0(run(with_faults("{kind: nan_loss, at_s: 3, for_s: 1.5}"), 8))
    assert [e.step for e in steps if math.isnan(e.loss)] == [6, 7, 8]  # ends 3.0, 3.5, 4.0


def test_loss_spike_multiplies_the_loss_of_the_window_only():
    plain = run(PLAIN, 8)
    spiked = run(with_faults("{kind: loss_spike, at_s: 2, for_s: 1}"), 8)
    ratio = {(e.step, e.rank): s.loss / e.loss for e, s in zip(plain, spiked, strict=True)}
    assert {k for k, r in ratio.items() if r != 1.0} == {(n, r) for n in (4, 5) for r in (0, 1)}
    assert all(r == pytest.approx(4.0) for r in ratio.values() if r != 1.0)
    one = run(with_faults("{kind: loss_spike, at_s: 2, magnitude: 10}"), 8)
    assert [e.step for e in rank0(one) if e.loss > 50] == [4]


def test_slow_steps_is_a_throughput_regression():
    steps = rank0(run(with_faults("{kind: slow_steps, at_s: 5, for_s: 6}"), 15))
    during = [e for e in steps if 5.75 < end_s(e) <= 11]
    assert len(during) >= 5
    assert all(e.step_time_s == pytest.approx(0.75, rel=0.02) for e in during)
    assert all(e.tokens_per_s == pytest.approx(16384 / 0.75, rel=0.02) for e in during)
    assert all(e.step_time_s == pytest.approx(0.5, rel=0.02) for e in steps if end_s(e) > 11.5)


@pytest.mark.parametrize("kind", ["stall", "gpu_lost"])
def test_a_stalled_or_lost_gpu_stops_every_rank(kind):
    steps = rank0(run(with_faults(f"{{kind: {kind}, node: 0, gpu: 1, at_s: 4.2, for_s: 2}}"),
                      10))
    assert not [e for e in steps if 4.2 < end_s(e) < 6.2]
    after = next(e for e in steps if end_s(e) >= 6.2)
    assert after.step_time_s == pytest.approx(2.5, rel=0.01)


@pytest.mark.parametrize(("fault", "factor"), [
    ("{kind: straggler, gpu: 1, at_s: 0, magnitude: 0.5}", 2.0),
    ("{kind: thermal_throttle, gpu: 0, at_s: 0, magnitude: 0.2}", 1.25),
    ("{kind: input_starvation, at_s: 0, magnitude: 0.5}", 2.0),
    ("{kind: input_starvation, at_s: 0, magnitude: 0.01}", 10.0),  # at most x10
])
def test_one_slow_gpu_slows_the_whole_job(fault, factor):
    steps = rank0(run(with_faults(fault), 30))
    assert all(e.step_time_s == pytest.approx(0.5 * factor, rel=0.02) for e in steps)


def test_the_slowest_gpu_sets_the_pace_not_the_sum():
    steps = rank0(run(with_faults("{kind: straggler, gpu: 1, at_s: 0, magnitude: 0.5}",
                                  "{kind: thermal_throttle, gpu: 0, at_s: 0, magnitude: 0.2}"),
                      10))
    assert all(e.step_time_s == pytest.approx(1.0, rel=0.02) for e in steps)


def test_faults_a_training_loop_does_not_feel_leave_steps_alone():
    faults = with_faults("{kind: power_cap, at_s: 1, magnitude: 0.5}", "{kind: xid, at_s: 2}",
                         "{kind: ecc_error, at_s: 2}", "{kind: memory_leak, at_s: 1}",
                         "{kind: link_degradation, gpu: 1, at_s: 1}")
    assert wire(run(faults, 10)) == wire(run(PLAIN, 10))


def test_the_gpu_simulator_ignores_training_only_faults():
    def series(text):
        sim = SimulatedGpus(parse(text), HZ)
        return sim.read_block(0, times(0, 500))

    plain_values, plain_events = series(PLAIN)
    values, events = series(with_faults("{kind: nan_loss, at_s: 1}",
                                        "{kind: loss_spike, at_s: 1, for_s: 2}",
                                        "{kind: slow_steps, at_s: 0}"))
    np.testing.assert_array_equal(values, plain_values)
    assert len(events) == len(plain_events)


# -- scenario validation -------------------------------------------------------------------
@pytest.mark.parametrize(("text", "message"), [
    ("training:\n  tokens_per_step: 0", "line 2: tokens_per_step must be >= 1"),
    ("training:\n  warmup_s: 1\n  loss_start: high", "line 3: loss_start must be a float"),
    ("training:\n  job_id: ''", "line 2: job_id must not be empty"),
    ("training:\n  batch: 8", "line 2: unknown training key 'batch'"),
    ("faults:\n  - kind: slow_steps\n    at_s: 1\n    magnitude: 0.5",
     "line 4: magnitude must be >= 1.0"),
    ("faults:\n  - {kind: nan_loss}", "line 2: fault 'nan_loss' has no onset at_s"),
    ("faults:\n  - {kind: loss_spike, at_s: 1, magnitude: big}",
     "line 2: magnitude must be a float"),
])
def test_training_errors_name_the_line(text, message):
    with pytest.raises(ScenarioError) as err:
        parse(text, "s.yaml")
    assert message in str(err.value)


def test_training_defaults_and_new_fault_defaults():
    s = parse("training: {tokens_per_step: 4096, loss_start: 6.5, job_id: j1}\n"
              "faults: [{kind: loss_spike, at_s: 3}, {kind: slow_steps, at_s: 4}]")
    assert (s.tokens_per_step, s.loss_start, s.job_id) == (4096, 6.5, "j1")
    assert [(f.magnitude, f.for_s) for f in s.faults] == [(4.0, None), (1.5, None)]
    d = parse("")
    assert (d.tokens_per_step, d.loss_start, d.job_id) == (16384, 10.0, None)


# -- the agent ships them ---------------------------------------------------------------
def test_records_go_to_the_train_topic_keyed_by_job_id():
    steps = run("nodes: 2\ngpus_per_node: 2\ntraining: {warmup_s: 0, job_id: j7}", 1.01)
    records = train_step_records(steps)
    assert len(records) == len(steps) == 2 * 4
    assert {(r.topic, r.key) for r in records} == {(TRAIN_EVENTS.name, b"j7")}
    assert training_pb2.TrainStep.FromString(records[3].value) == steps[3]


class Collector:
    """Stands in for the shipper, and for the event loop the sampler hands records to."""

    def __init__(self):
        self.records = []

    def submit(self, records):
        self.records += records

    def call_soon_threadsafe(self, callback, *args):
        callback(*args)


def test_agent_ships_the_steps_of_each_flush_with_the_metric_batches():
    scenario = parse("gpus_per_node: 2\ntraining: {warmup_s: 0, step_time_s: 0.1}")
    gpus = SimulatedGpus(scenario, HZ)
    loop = Collector()
    agent = Agent([(gpus, HZ)], shipper=loop, hz=HZ, flush_s=0.05,
                  training=SimulatedTraining(scenario, HZ))
    agent._sample_loop(loop, duration_s=0.65)  # samples 0-64
    train = [r for r in loop.records if r.topic == TRAIN_EVENTS.name]
    steps = [training_pb2.TrainStep.FromString(r.value) for r in train]
    assert {r.key for r in train} == {b"sim-job"}
    assert [(s.step, s.rank) for s in steps] == [(n, r) for n in range(1, 7) for r in (0, 1)]
    assert agent.stats.train_steps == 12
    assert agent.stats.batches == len(loop.records) - len(train)
    assert steps[0].time_ns == agent.tick_ns(10)              # 0.1 s on the sample clock


def build_agent(tmp_path, *flags, env=None):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["agent", "--source", "sim", "--spool-dir", str(tmp_path), *flags])
    agent, _ = build(args, load_settings(env or {}))
    return agent


def test_cli_wires_the_training_job_unless_told_not_to(tmp_path):
    assert build_agent(tmp_path).training.job_id == "sim-job"
    assert build_agent(tmp_path, "--node-id", "rack7").training.job_id == "rack7-job"
    assert build_agent(tmp_path, "--no-train-events").training is None


def test_every_metric_batch_names_the_job_its_gpus_work_for(tmp_path):
    from mlpe.common import batches

    def job_of(agent):
        loop = Collector()
        agent.shipper = loop
        agent._sample_loop(loop, duration_s=0.25)
        return {batches.decode(r.value).job_id for r in loop.records
                if r.topic != TRAIN_EVENTS.name and r.topic.startswith("mlpe.metrics")}

    assert job_of(build_agent(tmp_path, "--node-id", "rack7")) == {"rack7-job"}
    assert job_of(build_agent(tmp_path, "--job", "llama-70b")) == {"llama-70b"}
    assert job_of(build_agent(tmp_path, "--no-train-events",
                              env={"MLPE_JOB_ID": "from-env"})) == {"from-env"}


def test_step_jitter_makes_fast_and_slow_steps_the_same_every_run():
    text = PLAIN.replace("warmup_s: 0", "warmup_s: 0, step_jitter: 0.1")
    a = [m.step_time_s for m in rank0(run(text, 20))]
    assert a == [m.step_time_s for m in rank0(run(text, 20, block=37))]
    assert 0.44 < min(a) < 0.48 and 0.52 < max(a) < 0.56  # within ±10 % of 0.5 s
    plain = [m.step_time_s for m in rank0(run(PLAIN, 20))]
    assert plain == pytest.approx([0.5] * len(plain), rel=0.01)  # without it: all alike


@pytest.mark.parametrize("kind", ["checkpoint", "eval"])
def test_no_step_ends_in_a_checkpoint_or_eval_pause(kind):
    text = PLAIN.replace("warmup_s: 0", f"warmup_s: 0, idle_gaps: [{{at_s: 4, for_s: 3, "
                                        f"kind: {kind}}}]")
    steps = rank0(run(text, 10))
    ends = [(m.time_ns - EPOCH_NS) / 1e9 for m in steps]
    assert not any(4.01 < t < 7 for t in ends)
    after = next(m for m in steps if (m.time_ns - EPOCH_NS) / 1e9 > 7)
    assert after.step_time_s == pytest.approx(3.5, rel=0.01)  # the step carries the pause
