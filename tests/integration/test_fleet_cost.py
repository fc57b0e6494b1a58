"""What the fleet's GPUs cost, end to end: a simulated node of H100s whose job sits idle for
22 s in the middle of its 70 s run, agent → Kafka (metrics and inventory) → `mlpe stream` →
InfluxDB measurement `gpu_cost`: every 10 s window of every GPU priced at the shipped
H100 price, and the windows inside the idle gap, only they, counted as idle."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from mlpe.agent.agent import Agent, inventory_records
from mlpe.agent.scenario import parse
from mlpe.agent.shipper import Shipper
from mlpe.agent.sources.sim import SimulatedGpus
from mlpe.agent.sources.train_sim import SimulatedTraining
from mlpe.agent.spool import Spool
from mlpe.common import prices
from mlpe.common.settings import load as load_settings

from .test_stream import start_stream, stop, stream_env  # noqa: F401 - a fixture

# A whole window before the gap, at least one inside it and one after, wherever the run
# starts against the 10 s boundaries.
GPUS, SECONDS, GAP_AT, GAP_FOR = 2, 70, 21, 22
SCENARIO = f"""
seed: 3
nodes: 1
gpus_per_node: {GPUS}
training:
  step_time_s: 0.5
  warmup_s: 0
  job_id: JOB
  idle_gaps:
    - {{at_s: {GAP_AT}, for_s: {GAP_FOR}, kind: idle}}
"""
W = 10 * 10**9


def gpu_cost_points(e, node: str) -> dict[tuple[str, int], dict]:
    """{(gpu, window start ns): {field: value}} of the node's gpu_cost points."""
    with e.influx() as client:
        tables = client.query_api().query(f'''
            from(bucket: "{e.bucket_of('10s')}") |> range(start: -1h)
              |> filter(fn: (r) => r._measurement == "gpu_cost" and r.node == "{node}")''')
    points: dict[tuple[str, int], dict] = {}
    for table in tables:
        for r in table.records:
            key = (r.values["gpu"], int(r.get_time().timestamp() * 1e9))
            points.setdefault(key, {"gpu_type": r.values["gpu_type"],
                                    "currency": r.values["currency"]})[r.get_field()] = \
                r.get_value()
    return points


@pytest.mark.slow  # 70 s of a simulated node
def test_a_fleet_with_an_idle_gap_costs_every_window_and_counts_the_idle_ones(
        stream_env, tmp_path):  # noqa: F811 - the fixture
    e = stream_env
    unique = uuid.uuid4().hex[:8]
    node_prefix = f"fc{unique}-"
    stream = start_stream(unique, tmp_path / "stream.log")
    try:
        scenario = parse(SCENARIO.replace("JOB", f"fc{unique}-job"))
        sim = SimulatedGpus(scenario, 100, node_prefix=node_prefix)
        training = SimulatedTraining(scenario, 100, node_prefix=node_prefix)
        nodes = sim.node_inventories()
        agent = Agent([(sim, 100)], Shipper(e.kafka_bootstrap, Spool(tmp_path / "spool")),
                      hz=100, training=training, job_id=training.job_id,
                      inventory=inventory_records(list(nodes), nodes.__getitem__))
        t0 = time.time_ns()
        asyncio.run(agent.run(duration_s=SECONDS))
        node = f"{node_prefix}00"
        # Every window that ends 5 s before the run does is final and written by then.
        last_whole = (t0 + (SECONDS - 5) * 10**9) // W * W - W
        first_whole = -(-t0 // W) * W
        wanted = {(str(g), s) for g in range(GPUS) for s in range(first_whole, last_whole + 1, W)}
        deadline = time.monotonic() + 90
        while not wanted <= (points := gpu_cost_points(e, node)).keys():
            assert stream.poll() is None, (tmp_path / "stream.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"gpu_cost has {sorted(points)} of {wanted}"
            time.sleep(1)
    finally:
        stop(stream)

    price = prices.load(load_settings({}).prices_path).per_gpu_hour("h100-sxm")
    gap = (t0 + GAP_AT * 10**9, t0 + (GAP_AT + GAP_FOR) * 10**9)
    idle_windows = busy_windows = 0
    for (gpu, start), p in sorted(points.items()):
        assert (p["gpu_type"], p["currency"]) == ("h100-sxm", "USD")
        assert p["seconds"] == 10.0 if (gpu, start) in wanted else 1 <= p["seconds"] <= 10
        assert p["cost"] == pytest.approx(p["seconds"] * price / 3600)
        assert p["idle_cost"] == pytest.approx(p["idle_seconds"] * price / 3600)
        if gap[0] + 0.5e9 <= start and start + W <= gap[1] - 0.5e9:  # inside the gap
            assert p["idle_seconds"] == 10.0, (gpu, start - t0)
            idle_windows += 1
        elif start + W - 1e9 <= gap[0] or start + 1e9 >= gap[1]:  # >= 9 s of training
            assert p["idle_seconds"] == 0.0, (gpu, start - t0)
            busy_windows += 1
    assert idle_windows >= GPUS and busy_windows >= 2 * GPUS  # both kinds were judged
