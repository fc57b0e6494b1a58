
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
])
def test_errors_name_the_line(text, message):
    with pytest.raises(ScenarioError) as err:
        parse(text, "s.yaml")
    assert str(err.value).startswith("s.yaml, ")
    assert message in str(err.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load(tmp_path / "missing.yaml")
