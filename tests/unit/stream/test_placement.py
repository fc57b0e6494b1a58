"""The placement join: GPU batches without a job get the job whose pids run on the GPU."""

import numpy as np
import pytest

from mlpe.common import batches
from mlpe.stream.decoding import parse_placement
from mlpe.stream.placement import Placements
from mlpe.stream.windows import WindowSet
from mlpe.v1 import metrics_pb2 as pb
from mlpe.v1.training_pb2 import JobPlacement, RankProcess

T0 = 1_700_000_000 * 10**9
S = 10**9


def placement(job="job-a", node="node-1", pids=(4242, 4243), ended=False) -> JobPlacement:
    return JobPlacement(job_id=job, node_id=node, time_ns=T0, ended=ended, ranks=[
        RankProcess(rank=i, local_rank=i, pid=pid) for i, pid in enumerate(pids)])


def batch(t_ns: int, gpu=0, node="node-1", pids=(), job="", kind=pb.DEVICE_KIND_GPU,
          mib=1000.0) -> batches.Batch:
    """100 ms of one GPU from t_ns; `pids` as process-memory events (once a second)."""
    events = [pb.DeviceEvent(time_ns=t_ns, kind=pb.EVENT_PROCESS_MEMORY, code=pid, value=mib)
              for pid in pids]
    times = t_ns + np.arange(10, dtype=np.int64) * 10**7
    return batches.Batch(node_id=node, device_kind=kind, device_index=gpu, device_uuid="",
                         agent_epoch_ns=1, batch_seq=0, first_sample_seq=0,
                         timestamps_ns=times, columns={pb.GPU_UTIL: np.full(10, 90.0)},
                         events=events, job_id=job)


def test_pids_name_the_job_and_it_holds_between_events():
    p = Placements()
    p.apply(placement())
    assert p.job_of(batch(T0, gpu=0, pids=[4242])) == "job-a"
    assert p.job_of(batch(T0, gpu=1, pids=[4243])) == "job-a"
    for tenth in range(1, 10):  # batches without events: the job last learned
        assert p.job_of(batch(T0 + tenth * S // 10, gpu=0)) == "job-a"
    assert p.job_of(batch(T0, gpu=2)) == ""  # never named a placed pid
    assert p.job_of(batch(T0, gpu=0, node="node-2", pids=[4242])) == ""  # other node


def test_unknown_pids_and_batches_before_any_event_have_no_job():
    p = Placements()
    assert p.job_of(batch(T0, pids=[4242])) == ""  # placement not known yet
    p.apply(placement())
    assert p.job_of(batch(T0, pids=[999])) == ""
    assert p.job_of(batch(T0 + S, pids=[999, 4242])) == "job-a"
    # The GPU's processes are all others now: it works for job-a no more.
    assert p.job_of(batch(T0 + 2 * S, pids=[999])) == ""
    assert p.job_of(batch(T0 + 2 * S + S // 10)) == ""


def test_an_ended_placement_is_forgotten():
    p = Placements()
    p.apply(placement())
    assert p.job_of(batch(T0, pids=[4242])) == "job-a"
    p.apply(placement(pids=(), ended=True))
    assert p.job_of(batch(T0 + S // 10)) == ""  # the GPU's last-known job too
    assert p.job_of(batch(T0 + S, pids=[4242])) == ""
    assert p.pids == {} and p.placed == {}


def test_a_relaunch_replaces_the_pids_and_a_reused_pid_goes_to_the_newer_job():
    p = Placements()
    p.apply(placement(pids=(4242, 4243)))
    p.apply(placement(pids=(5000, 5001)))  # restarted: new processes
    assert p.job_of(batch(T0, pids=[4242])) == ""
    assert p.job_of(batch(T0, pids=[5000])) == "job-a"
    p.apply(placement(job="job-b", pids=(5001,)))
    assert p.job_of(batch(T0, gpu=1, pids=[5001])) == "job-b"
    p.apply(placement(pids=(), ended=True))  # job-a's end leaves job-b's pid alone
    assert p.job_of(batch(T0 + S, gpu=1, pids=[5001])) == "job-b"
    assert p.job_of(batch(T0 + S, gpu=0, pids=[5000])) == ""


def test_the_job_last_learned_expires_without_events():
    p = Placements(forget_after_s=30)
    p.apply(placement())
    assert p.job_of(batch(T0, pids=[4242])) == "job-a"
    assert p.job_of(batch(T0 + 29 * S)) == "job-a"
    assert p.job_of(batch(T0 + 31 * S)) == ""
    assert p.job_of(batch(T0 + 32 * S)) == ""  # forgotten, not only hidden
    assert p.job_of(batch(T0 + 33 * S, pids=[4242])) == "job-a"  # learned again


def test_a_shared_gpu_goes_to_the_job_using_the_most_memory():
    p = Placements()
    p.apply(placement(job="small", pids=(10,)))
    p.apply(placement(job="big", pids=(20,)))
    b = batch(T0, pids=[10, 20])
    b.events[0].value, b.events[1].value = 500.0, 60_000.0
    assert p.job_of(b) == "big"


def test_batches_with_a_job_and_host_batches_are_left_alone():
    p = Placements()
    p.apply(placement())
    assert p.job_of(batch(T0, pids=[4242], job="own-job")) == "own-job"
    assert p.job_of(batch(T0 + S // 10)) == ""  # that batch taught nothing
    assert p.job_of(batch(T0, kind=pb.DEVICE_KIND_HOST, pids=[4242])) == ""


def test_a_window_takes_the_job_learned_after_it_opened():
    windows = WindowSet(1.0, 0.0, 2.0)
    first, second = batch(T0), batch(T0 + S // 10, job="job-a")
    windows.add("p", first, "t1")
    windows.add("p", second, "t2")
    closed = windows.close_ready(flush_all=True)
    assert [d.job for c in closed for d in c.devices] == ["job-a"]
    assert "job=job-a" in closed[0].lines[0]


def test_parse_placement_accepts_the_contract():
    good = placement()
    assert parse_placement(b"node-1/job-a", good.SerializeToString()) == good
    ended = placement(pids=(), ended=True)
    assert parse_placement(b"node-1/job-a", ended.SerializeToString()) == ended


@pytest.mark.parametrize(("key", "raw", "reason"), [
    (b"k", b"\xff\xff not protobuf", "not a JobPlacement"),
    (b"node-1/", placement(job="").SerializeToString(), "job_id and node_id must not be empty"),
    (b"node-1/other", placement().SerializeToString(), "key 'node-1/other' is not"),
    (b"node-1/job-a", placement(pids=()).SerializeToString(), "no ranks and not ended"),
    (b"node-1/job-a", placement(pids=(0, 5)).SerializeToString(), "not all positive"),
    (b"node-1/job-a", placement(pids=(5, 5)).SerializeToString(), "repeat"),
])
def test_parse_placement_refuses_what_cannot_be_true(key, raw, reason):
    with pytest.raises(ValueError, match=reason):
        parse_placement(key, raw)


def test_jobs_of_a_node_batch_are_learned_per_gpu():
    p = Placements()
    p.apply(placement())
    node = batches.join([batch(T0, pids=[4242]), batch(T0)])
    node.device_indices[1] = 1  # the second GPU names no pid
    assert p.jobs_of(node) == ["job-a", ""]
    assert p.jobs_of(batches.join([batch(T0 + S // 10)])) == ["job-a"]  # remembered
    p.apply(placement(pids=(), ended=True))
    assert p.jobs_of(batches.join([batch(T0 + S // 5)])) == [""]
    assert p.learned_on == {}
