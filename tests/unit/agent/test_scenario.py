
import pytest

from mlpe.agent.scenario import ScenarioError, load, packaged, parse

EXAMPLE = packaged("faults.yaml")


def test_example_scenario_has_every_gpu_fault_kind():
    from mlpe.agent.scenario import FAULT_KINDS, TRAINING_ONLY_KINDS

    s = load(EXAMPLE)
    assert (s.seed, s.nodes, s.gpus_per_node) == (7, 2, 8)
    assert {f.kind for f in s.faults} == set(FAULT_KINDS) - TRAINING_ONLY_KINDS
    xid = next(f for f in s.faults if f.kind == "xid")
    assert (xid.node, xid.gpu, xid.at_s, xid.magnitude) == (0, 1, 120.0, 79.0)
    starving = next(f for f in s.faults if f.kind == "input_starvation")
    assert starving.gpu is None and starving.active(260) and not starving.active(300)


def test_empty_file_is_the_default_scenario():
    assert parse("").nodes == 1


@pytest.mark.parametrize(("text", "message"), [
    ("nodes: [1", "line 1: not valid YAML"),
    ("nodes: two", "line 1: nodes must be a int, got 'two'"),
    ("nodes: 0", "line 1: nodes must be >= 1"),
    ("seed: 1\ncolour: red", "line 2: unknown key 'colour'"),
    ("faults:\n  - {kind: overheat, at_s: 1}", "line 2: unknown fault kind 'overheat'"),
    ("nodes: 2\nfaults:\n  - kind: xid\n    node: 5\n    at_s: 3",
     "line 4: node 5 does not exist (the scenario has 2 nodes, 0-1)"),
    ("faults:\n  - kind: stall\n    gpu: 9\n    at_s: 3", "line 3: gpu 9 does not exist"),
    ("faults:\n  - kind: stall", "line 2: fault 'stall' has no onset at_s"),
    ("faults:\n  - {kind: stall, at_s: 1, when: now}", "line 2: unknown fault key 'when'"),
    ("faults: 3", "line 1: faults must be a list"),
    ("training:\n  step_time_s: 0", "line 2: step_time_s must be >= 0.02"),
    ("training:\n  idle_gaps:\n    - {at_s: 1, for_s: 2, kind: lunch}",
     "line 3: unknown gap kind 'lunch' (expected one of checkpoint, eval, idle)"),
    ("training:\n  idle_gaps:\n    - {at_s: 1, until: 2}", "line 3: unknown idle_gaps key 'until'"),
    ("training:\n  step_jitter: 0.5", "line 2: step_jitter must be below 0.5"),
    ("training:\n  step_jitter: -0.1", "line 2: step_jitter must be >= 0.0"),
])
def test_errors_name_the_line(text, message):
    with pytest.raises(ScenarioError) as err:
        parse(text, "s.yaml")
    assert str(err.value).startswith("s.yaml, ")
    assert message in str(err.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load(tmp_path / "missing.yaml")


def test_gap_kinds_and_step_jitter_parse():
    s = parse("training:\n  step_jitter: 0.1\n  idle_gaps:\n    - {at_s: 5, for_s: 2, kind: eval}"
              "\n    - {at_s: 9, for_s: 1}")
    assert s.step_jitter == 0.1
    assert [(g.at_s, g.kind) for g in s.idle_gaps] == [(5.0, "eval"), (9.0, "idle")]


def test_detect_scenarios_grade_the_subtle_faults_three_times_each():
    """Issue 17 point 6: the bench scores each of these grades over three seeds, and its
    fault-free fleets hold every benign look-alike."""
    from mlpe.run.score import grade_of

    scenarios = [load(f) for f in sorted(packaged("detect").glob("*.yaml"))]
    grades = [grade_of(f) for s in scenarios for f in s.faults]
    for grade in ("straggler 0.1 gpu", "straggler 0.15 gpu", "straggler 0.25 gpu",
                  "link_degradation 0.3 node", "link_degradation 0.5 node",
                  "slow_steps 1.18 job", "slow_steps 1.25 job", "slow_steps 1.43 job"):
        assert grades.count(grade) == 3, grade
    clean = [s for s in scenarios if not s.faults]
    assert {g.kind for s in clean for g in s.idle_gaps} == {"idle", "checkpoint", "eval"}
    assert min(s.step_time_s for s in clean) <= 0.1 and max(s.step_time_s for s in clean) >= 2
    assert all(s.warmup_s > 0 and s.step_jitter > 0 for s in clean)
