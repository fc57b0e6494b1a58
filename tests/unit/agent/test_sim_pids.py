"""`--pids`: simulated GPUs name their processes once a second, as NVML does, and their
batches carry no simulated job id, so the stream learns the job from mlpe.placement."""

import argparse

import numpy as np
import pytest

from mlpe.agent import main as agent_main
from mlpe.agent.scenario import parse
from mlpe.agent.sources.sim import COL, DRIVER_MIB, SimulatedGpus
from mlpe.common.settings import load
from mlpe.v1 import metrics_pb2 as pb
from tests.helpers import mlpe, mlpe_env

HZ = 100


def process_events(events):
    return [(k, row, e.code, e.value) for k, row, e in events
            if e.kind == pb.EVENT_PROCESS_MEMORY]


def test_process_memory_once_a_second_per_placed_gpu_on_every_node():
    sim = SimulatedGpus(parse("nodes: 2\ngpus_per_node: 3"), HZ, pids={0: 4242, 2: 4243})
    times = np.arange(250, dtype=np.int64) * 10**7
    values, events = sim.read_block(0, times)
    found = process_events(events)
    # Ticks 0, 100, 200; rows 0 and 2 of node 0, 3 and 5 of node 1.
    assert [(k, row, pid) for k, row, pid, _ in found] == [
        (k, row, pid) for k in (0, 100, 200) for row, pid in
        ((0, 4242), (2, 4243), (3, 4242), (5, 4243))]
    for k, row, _, mib in found:
        assert mib == pytest.approx(values[k, row, COL[pb.GPU_MEM_USED]] - DRIVER_MIB)
        assert 50_000 < mib < 80_000


def test_process_events_do_not_depend_on_the_block_size():
    text = "nodes: 1\ngpus_per_node: 2"
    whole = SimulatedGpus(parse(text), HZ, pids={1: 7})
    times = np.arange(300, dtype=np.int64) * 10**7
    _, all_at_once = whole.read_block(0, times)
    sliced = SimulatedGpus(parse(text), HZ, pids={1: 7})
    in_blocks = []
    for k0 in range(0, 300, 10):
        _, events = sliced.read_block(k0, times[k0:k0 + 10])
        in_blocks += [(k0 + i, row, e) for i, row, e in events]
    assert process_events(all_at_once) == process_events(in_blocks)


def test_a_lost_gpu_names_no_process():
    sim = SimulatedGpus(parse("nodes: 1\ngpus_per_node: 2\nfaults:\n"
                              "  - {kind: gpu_lost, gpu: 0, at_s: 0.5, for_s: 2}"), HZ,
                        pids={0: 1, 1: 2})
    _, events = sim.read_block(0, np.arange(400, dtype=np.int64) * 10**7)
    assert [(k, row) for k, row, *_ in process_events(events)] == [
        (0, 0), (0, 1), (100, 1), (200, 1), (300, 0), (300, 1)]


def test_without_pids_nothing_changes():
    _, events = SimulatedGpus(parse("nodes: 1"), HZ).read_block(
        0, np.arange(200, dtype=np.int64) * 10**7)
    assert process_events(events) == []


def build(tmp_path, *flags, env=None):
    parser = argparse.ArgumentParser()
    agent_main.register(parser.add_subparsers())
    args = parser.parse_args(["agent", "--source", "sim", "--spool-dir", str(tmp_path), *flags])
    settings = load({"MLPE_STATE_DIR": str(tmp_path / "state"), **(env or {})})
    agent, _ = agent_main.build(args, settings)
    return agent


def test_pids_leave_the_batches_job_to_the_stream(tmp_path):
    assert build(tmp_path).buffers[0].job_id == "sim-job"  # as before
    assert build(tmp_path, "--node-id", "n").buffers[0].job_id == "n-job"
    agent = build(tmp_path, "--gpus", "2", "--pids", "0=4242,1=4243")
    assert agent.buffers[0].job_id == ""
    assert agent.buffers[0].source.process_rows == [(0, 4242), (1, 4243)]
    assert build(tmp_path, "--pids", "0=1", "--job", "mine").buffers[0].job_id == "mine"
    assert build(tmp_path, "--pids", "0=1", env={"MLPE_JOB_ID": "env-job"}
                 ).buffers[0].job_id == "env-job"
    scenario = tmp_path / "s.yaml"
    scenario.write_text("nodes: 1\ntraining:\n  job_id: scenario-job\n")
    assert build(tmp_path, "--pids", "0=1", "--scenario", str(scenario)
                 ).buffers[0].job_id == "scenario-job"


@pytest.mark.parametrize(("flags", "message"), [
    (["--pids", "0:4242"], "--pids '0:4242': expected GPU=PID pairs like 0=4242,1=4243"),
    (["--pids", ""], "--pids '': expected GPU=PID pairs"),
    (["--pids", "0=0"], "--pids '0=0': expected GPU=PID pairs"),
    (["--pids", "0=x"], "--pids '0=x': expected GPU=PID pairs"),
    (["--pids=-1=5"], "--pids '-1=5': expected GPU=PID pairs"),
    (["--pids", f"0={(1 << 22) + 1}"], "expected GPU=PID pairs"),
    (["--gpus", "2", "--pids", "2=5"],
     "--pids '2=5': GPU 2 is not one of the 2 simulated GPUs per node (0 to 1)"),
    (["--pids", "0=5,0=6"], "--pids '0=5,0=6': GPU 0 is given twice"),
])
def test_bad_pids(tmp_path, flags, message):
    with pytest.raises(agent_main.UsageError, match=message.replace("(", r"\(").replace(
            ")", r"\)")):
        build(tmp_path, *flags)


def test_pids_without_the_simulator_is_one_line_and_exit_2():
    out = mlpe("agent", "--source", "host", "--pids", "0=5", env=mlpe_env(), timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "mlpe agent: --pids '0=5': only for the simulator (--source sim); NVML reports real "
        "processes itself")
