"""`mlpe agent` and `mlpe tail` refuse bad input with one line naming the problem."""

import pytest

from tests.helpers import mlpe as run_mlpe
from tests.helpers import mlpe_env


def mlpe(*args, env=None):
    return run_mlpe(*args, env=mlpe_env(**(env or {})), timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    (["--source", "gpu"], "--source 'gpu': unknown source gpu; choose from nvml, host, sim"),
    (["--source", "sim", "--hz", "fast"], "--hz 'fast': expected a number from 0.1 to 1000"),
    (["--source", "sim", "--hz", "0"], "--hz '0': expected a number from 0.1 to 1000"),
    (["--source", "sim", "--nodes", "-2"], "--nodes '-2': expected an integer from 1"),
    (["--source", "sim", "--flush-ms", "x"], "--flush-ms 'x': expected a number"),
    (["--source", "sim", "--scenario", "/no/such.yaml"], "/no/such.yaml: cannot read scenario"),
])
def test_bad_flags(args, message):
    out = mlpe("agent", *args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"mlpe agent: {message}" or \
        message in out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_scenario_names_the_line(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("nodes: 1\nfaults:\n  - {kind: meltdown, at_s: 3}\n")
    out = mlpe("agent", "--source", "sim", "--scenario", str(bad))
    assert out.returncode == 2
    assert f"{bad}, line 3: unknown fault kind 'meltdown'" in out.stderr


def test_tail_refuses_unknown_topic():
    out = mlpe("tail", "metrics")
    assert out.returncode == 2 and "'metrics' is not an mlpe topic" in out.stderr
