"""The placement join end to end: a JobPlacement on mlpe.placement, a simulated agent
naming those pids (`--pids`, no `--job`), and the GPUs' InfluxDB points tagged with the
job by `mlpe stream`."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer

from mlpe.common.topics import PLACEMENT
from mlpe.v1.training_pb2 import JobPlacement, RankProcess
from tests.helpers import mlpe_env, start_mlpe, stop_child
from tests.integration.test_stream import (  # noqa: F401 - stream_env: a fixture
    start_stream,
    stop,
    stream_env,
    wait_for,
)

# With the other tests that start `mlpe stream` (test_stream.py says why).
pytestmark = pytest.mark.xdist_group("stream-b")

PIDS = (4242, 4243)


async def publish(producer, node: str, job: str, pids=(), ended=False) -> None:
    """What `mlpe control` sends at a launch (and, ended, when the processes are gone)."""
    placement = JobPlacement(job_id=job, node_id=node, time_ns=time.time_ns(), ended=ended,
                             ranks=[RankProcess(rank=i, local_rank=i, pid=pid)
                                    for i, pid in enumerate(pids)])
    await producer.send_and_wait(PLACEMENT.name, placement.SerializeToString(),
                                 key=f"{node}/{job}".encode())


def jobs_of_windows(e, prefix: str) -> dict[tuple[str, str], list[str]]:
    """{(node, gpu): the job tag of each of its 1 s windows ("" if none)}, nodes `prefix…`."""
    with e.influx() as client:
        tables = client.query_api().query(f'''
            import "strings"
            from(bucket: "{e.bucket_of('1s')}") |> range(start: -1h)
              |> filter(fn: (r) => r._measurement == "gpu" and r.window == "1s"
                                   and strings.hasPrefix(v: r.node, prefix: "{prefix}")
                                   and r._field == "samples")''')
    found: dict[tuple[str, str], list[str]] = {}
    for table in tables:
        for r in table.records:
            found.setdefault((r["node"], r["gpu"]), []).append(r.values.get("job") or "")
    return found


async def test_gpu_points_carry_the_job_whose_pids_run_on_them(stream_env, unique,  # noqa: F811
                                                               tmp_path):
    e = stream_env
    prefix, job = f"p{unique}", f"p{unique}-job"
    nodes = [f"{prefix}-00", f"{prefix}-01"]  # the simulator's node ids for --node-id prefix
    producer = AIOKafkaProducer(bootstrap_servers=e.kafka_bootstrap)
    await producer.start()
    stream = agent = None
    try:
        # One placement before the stream starts (its first read of the topic), one while
        # it runs (followed as the topic grows).
        await publish(producer, nodes[0], job, PIDS)
        stream = start_stream(unique, tmp_path / "stream.log")
        await publish(producer, nodes[1], job, PIDS)
        env = mlpe_env(MLPE_JOB_ID=None, MLPE_STATE_DIR=str(tmp_path / "agent-state"))
        agent = start_mlpe("agent", "--source", "sim", "--node-id", prefix, "--nodes", "2",
                           "--gpus", "3", "--pids", ",".join(f"{g}={p}" for g, p in
                                                             enumerate(PIDS)),
                           "--no-train-events", "--duration", "8", env=env,
                           log=tmp_path / "agent.log")
        await asyncio.to_thread(agent.wait, 60)
        assert agent.returncode == 0, (tmp_path / "agent.log").read_text()[-2000:]
        found = await wait_for(
            lambda: (lambda f: f if len(f) == 6 and min(map(len, f.values())) >= 6 else None)(
                jobs_of_windows(e, prefix)), 90, "1 s windows of 6 GPUs in InfluxDB", stream)
        for node in nodes:
            for gpu in ("0", "1"):  # GPU 0 runs pid 4242, GPU 1 pid 4243: both the job's
                assert set(found[(node, gpu)]) == {job}, (node, gpu, found[(node, gpu)])
            assert set(found[(node, "2")]) == {""}  # no process on GPU 2: no job
        assert stream.poll() is None
    finally:
        for node in nodes:  # as control does when the processes end
            await publish(producer, node, job, ended=True)
        await producer.stop()
        if agent is not None:
            stop_child(agent, timeout=5)
        if stream is not None:
            stop(stream)
