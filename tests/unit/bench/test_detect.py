"""The detect bench's scoring: what counts as a true alert, a false alarm, a delay."""

import argparse

import pytest

from mlpe.bench.detect import bench_detect
from mlpe.run.score import Incident, Received, score


def incident(kind="straggler", node="fleet-00", onset=100.0, end=120.0, scenario="a"):
    return Incident(scenario, kind, node, "fleet-job", onset, end)


def alert(at, labels, scenario="a"):
    return Received(at, scenario, "rule", "peer", labels)


def test_right_node_in_time_is_true_and_sets_the_delay():
    incs = [incident(), incident("xid", "fleet-01", 200.0, 211.0)]
    result = score(incs, [alert(103.5, {"node": "fleet-00", "gpu": "2"}),
                          alert(104.0, {"job": "fleet-job"}),          # job-wide symptom
                          alert(150.0, {"node": "fleet-00"}),          # between incidents
                          alert(201.0, {"node": "fleet-00"})])         # wrong node
    assert result["recall"] == 0.5 and result["false_alarms"] == 2
    assert result["precision"] == 0.5
    assert result["per_fault"]["straggler"]["delay_p50_s"] == 3.5
    assert result["per_fault"]["xid"]["detected"] == 0
    assert result["per_fault"]["xid"]["precision"] == 0.0  # its only alert blamed node 00


def test_alerts_of_a_fault_free_fleet_are_false_alarms():
    result = score([incident()], [alert(105.0, {"node": "fleet-00"}, scenario="clean")])
    assert result["false_alarms"] == 1 and result["recall"] == 0.0


def test_a_bad_scenario_file_is_named():
    args = argparse.Namespace(scenarios="/nonexistent-dir", hz=100.0, workers=1, grace=10.0,
                              details=None)
    with pytest.raises(RuntimeError, match=r"no \*\.yaml scenario files"):
        bench_detect(args, None)


def test_recall_and_delays_per_grade():
    from dataclasses import replace

    graded = [replace(incident(onset=100.0 * i, end=100.0 * i + 25), grade=g)
              for i, g in enumerate(["straggler 0.1 gpu", "straggler 0.1 gpu",
                                     "straggler 0.25 gpu"], start=1)]
    result = score(graded, [alert(104.0, {"node": "fleet-00"}),
                            alert(308.5, {"node": "fleet-00"})])
    assert result["per_grade"]["straggler 0.1 gpu"] == {
        "incidents": 2, "detected": 1, "recall": 0.5, "delay_p50_s": 4.0, "delay_max_s": 4.0}
    assert result["per_grade"]["straggler 0.25 gpu"]["delay_max_s"] == 8.5
    assert result["per_fault"]["straggler"]["recall"] == 0.667


def test_grades_name_magnitude_and_scope():
    from mlpe.agent.scenario import Fault
    from mlpe.run.score import grade_of

    assert grade_of(Fault("link_degradation", 1, None, 5.0, 15.0, 0.3)) == \
        "link_degradation 0.3 node"
    assert grade_of(Fault("straggler", 0, 2, 5.0, 15.0, 0.1)) == "straggler 0.1 gpu"
    assert grade_of(Fault("slow_steps", 0, None, 5.0, 15.0, 1.18)) == "slow_steps 1.18 job"
    assert grade_of(Fault("xid", 0, 2, 5.0, 0.0, 94.0)) == "xid"
