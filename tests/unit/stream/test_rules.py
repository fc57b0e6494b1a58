import numpy as np
import pytest

from mlpe.common import batches
from mlpe.stream.rules import RulesError, device_stats, evaluate, load, parse, step
from mlpe.v1 import alerts_pb2 as al
from mlpe.v1 import metrics_pb2 as pb
from tests.helpers import REPO_ROOT

GOOD = """rules:
  - name: hot
    when: gpu.temp.max > 85
    for: 2s
    severity: critical
    labels: {node: "rack1-*"}
  - name: busy_host
    when: host.cpu_util >= 95
    severity: warning
"""


def test_parse_good_file_and_shipped_defaults():
    hot, busy = parse(GOOD)
    assert (hot.measurement, hot.field, hot.stat, hot.op, hot.threshold, hot.hold_s) == (
        "gpu", pb.GPU_TEMP, "max", ">", 85.0, 2.0)
    assert hot.matches({"node": "rack1-07"}) and not hot.matches({"node": "rack2-01"})
    assert (busy.field, busy.stat, busy.hold_s) == (pb.HOST_CPU_UTIL, "mean", 0.0)
    assert len(load(REPO_ROOT / "deploy" / "rules" / "default.yaml")) >= 3


@pytest.mark.parametrize(("text", "message"), [
    ("rules:\n  - name: a\n    when: gpu.tmp > 3\n    severity: warning\n",
     "line 3: gpu has no field 'tmp'"),
    ("rules:\n  - name: a\n    when: gpu.temp >> 3\n    severity: warning\n",
     "line 3: cannot read 'gpu.temp >> 3'"),
    ("rules:\n  - name: a\n    when: gpu.temp > 3\n    severity: loud\n",
     "line 4: severity must be one of"),
    ("rules:\n  - name: a\n    when: gpu.temp > 3\n    severity: info\n    for: soon\n",
     "line 5: 'for': 'soon' is not a duration"),
    ("rules:\n  - name: a\n    when: gpu.temp > 3\n    severity: info\n    colour: red\n",
     "line 5: unknown key 'colour'"),
    ("rules:\n  - {name: a, when: gpu.temp > 3, severity: info}\n"
     "  - {name: a, when: gpu.temp > 4, severity: info}\n", "line 3: rule 'a' defined twice"),
    ("rules:\n  - {name: a, severity: info}\n", "line 2: rule has no 'when'"),
    ("rules: [", "not valid YAML"),
])
def test_errors_point_to_the_line(text, message):
    with pytest.raises(RulesError) as err:
        parse(text, "r.yaml")
    assert str(err.value).startswith("r.yaml, ") and message in str(err.value)


def test_hold_then_fire_once_then_resolve():
    [rule] = parse("rules:\n  - {name: a, when: gpu.temp > 80, for: 2s, severity: info}\n")
    s, out = None, []
    for second, temp in enumerate([70, 90, 90, 90, 90, 70, 70]):
        s, alert = step(rule, s, temp, second * 10**9)
        out.append(alert)
    assert out == [None, None, None, al.ALERT_FIRING, None, al.ALERT_RESOLVED, None]


def test_condition_broken_before_hold_never_fires():
    [rule] = parse("rules:\n  - {name: a, when: gpu.temp > 80, for: 2s, severity: info}\n")
    s = None
    for second, temp in enumerate([90, 90, 70, 90, 90]):
        s, alert = step(rule, s, temp, second * 10**9)
        assert alert is None


def test_device_stats_skip_nan_and_inf_per_device():
    v = np.array([[1.0, np.nan, 5.0], [np.nan, np.nan, np.nan], [2.0, np.inf, np.nan]])
    assert device_stats(v, "min")[[0, 2]].tolist() == [1, 2]
    assert device_stats(v, "max")[[0, 2]].tolist() == [5, 2]
    assert device_stats(v, "last")[[0, 2]].tolist() == [5, 2]
    assert device_stats(v, "mean")[[0, 2]].tolist() == [3, 2]
    assert np.isnan(device_stats(v, "mean")[1]) and np.isnan(device_stats(v, "last")[1])


def test_one_node_batch_judges_each_device_on_its_own():
    rules = parse("rules:\n  - {name: hot, when: gpu.temp.max > 80, severity: critical}\n")
    times = 1_700_000_000 * 10**9 + np.arange(10, dtype=np.int64) * 10**8
    node = batches.join([batches.Batch("n1", pb.DEVICE_KIND_GPU, g, "", 1, 0, 0, times,
                                       {pb.GPU_TEMP: np.full(10, 70.0 + 10 * g)})
                         for g in range(4)])
    states: dict = {}
    fired = evaluate(rules, states, node)
    assert sorted(a.labels["gpu"] for a in fired) == ["2", "3"]
    assert sorted(states) == ["hot|n1|2", "hot|n1|3"]  # the cool GPUs keep no state


def gpu_batch(second: int, temp: float, node: str = "rack1-01", gpu: int = 3) -> batches.Batch:
    times = (1_700_000_000 + second) * 10**9 + np.arange(10, dtype=np.int64) * 10**8
    return batches.Batch(node, pb.DEVICE_KIND_GPU, gpu, "", 1, second, 0, times,
                         {pb.GPU_TEMP: np.full(10, temp)})


def test_evaluate_fires_and_resolves_per_device_with_the_rule_text():
    rules = parse("rules:\n  - {name: hot, when: gpu.temp.max > 80, for: 1s, severity: "
                  "critical, labels: {node: 'rack1-*'}, summary: 'GPU {gpu} on {node} hot', "
                  "explanation: '{value:.0f} for {for}'}\n")
    states: dict = {}
    out = []
    for second, temp in enumerate([90, 90, 90, 70]):
        out += evaluate(rules, states, gpu_batch(second, temp))
        assert evaluate(rules, states, gpu_batch(second, temp, node="rack2-01")) == []
    firing, resolved = out
    assert (firing.state, firing.rule, firing.detector, dict(firing.labels)) == (
        al.ALERT_FIRING, "hot", "rule", {"node": "rack1-01", "gpu": "3"})
    assert (firing.summary, firing.explanation) == ("GPU 3 on rack1-01 hot", "90 for 1s")
    assert firing.starts_at_ns == gpu_batch(0, 90).timestamps_ns[-1] and firing.ends_at_ns == 0
    assert resolved.state == al.ALERT_RESOLVED and resolved.fingerprint == firing.fingerprint
    assert resolved.starts_at_ns == firing.starts_at_ns
    assert resolved.ends_at_ns == gpu_batch(3, 70).timestamps_ns[-1]
    assert "no longer holds (now 70)" in resolved.explanation
    assert states == {}  # resolved: idle again, nothing kept (the other node never matched)
