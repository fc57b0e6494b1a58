"""The fleet's gpu_cost points: priced by the node's inventory, idle by the window's mean
utilization, partial windows paying for their part; inventories checked."""

import numpy as np
import pytest

from mlpe.common.prices import Price, PriceTable
from mlpe.stream.decoding import Limits, parse_inventory
from mlpe.stream.fleet_cost import gpu_cost_lines, inventory_types
from mlpe.stream.windows import WindowSet
from mlpe.v1 import metrics_pb2 as pb
from tests.unit.stream.test_windows import T0, batch

TABLE = PriceTable("EUR", "a test", "2026-12-01", {"h100-sxm": Price(3.6, 1.8)})


def closed_windows(utils: list[float], seconds: int, node="n1"):
    """A node's closed 10 s GPU windows, one GPU per entry of `utils` (its utilization),
    with 100 Hz samples in the first `seconds` seconds of the window."""
    windows = WindowSet(10, 0, 60)
    for gpu, util in enumerate(utils):
        windows.add(0, batch(0, 100 * seconds, np.full(100 * seconds, util), node=node,
                             gpu=gpu, fields=(pb.GPU_UTIL,)), token=gpu)
    return windows.close_ready(flush_all=True)


def test_every_gpu_window_is_priced_by_its_node_inventory_and_idle_ones_counted():
    inventory = pb.NodeInventory(node_id="n1", gpus=[
        pb.GpuInfo(index=0, name="NVIDIA H100 80GB HBM3"),
        pb.GpuInfo(index=1, name="NVIDIA H100 80GB HBM3"),
        pb.GpuInfo(index=2, name="Tesla T4")])
    types = {"n1": inventory_types(inventory)}
    assert types["n1"] == {0: "h100-sxm", 1: "h100-sxm", 2: "unknown"}
    lines = gpu_cost_lines(closed_windows([90.0, 2.0, 50.0], 10), types, TABLE, "spot", 5.0)
    assert lines == [
        f"gpu_cost,node=n1,gpu=0,gpu_type=h100-sxm,currency=EUR,window=10s seconds=10.0,"
        f"idle_seconds=0.0,cost={10 * 1.8 / 3600!r},idle_cost=0.0 {T0}",
        f"gpu_cost,node=n1,gpu=1,gpu_type=h100-sxm,currency=EUR,window=10s seconds=10.0,"
        f"idle_seconds=10.0,cost={10 * 1.8 / 3600!r},idle_cost={10 * 1.8 / 3600!r} {T0}",
        f"gpu_cost,node=n1,gpu=2,gpu_type=unknown,currency=EUR,window=10s seconds=10.0,"
        f"idle_seconds=0.0,cost=0.0,idle_cost=0.0 {T0}"]


def test_a_partial_window_pays_for_its_seconds_and_no_inventory_means_unknown():
    [line] = gpu_cost_lines(closed_windows([0.0], 4, node="n2"), {}, TABLE, "on_demand", 5.0)
    assert line.startswith("gpu_cost,node=n2,gpu=0,gpu_type=unknown,")
    assert "seconds=4.0,idle_seconds=4.0,cost=0.0" in line


def test_only_final_10s_gpu_windows_make_points():
    windows = WindowSet(1, 0, 60)
    windows.add(0, batch(0, 100, np.full(100, 50.0), fields=(pb.GPU_UTIL,)), token=None)
    assert gpu_cost_lines(windows.close_ready(flush_all=True), {}, TABLE, "spot", 5.0) == []


@pytest.mark.parametrize("inventory, says", [
    (b"\xff\xfe", "not a NodeInventory"),
    (pb.NodeInventory(node_id="a b").SerializeToString(), "node_id 'a b' is not"),
    (pb.NodeInventory(node_id="n", gpus=[pb.GpuInfo(index=i) for i in range(65)])
     .SerializeToString(), "65 GPUs, more than MLPE_STREAM_MAX_DEVICES=64"),
    (pb.NodeInventory(node_id="n", gpus=[pb.GpuInfo(index=-1)]).SerializeToString(),
     "GPU indices [-1] are not all in 0..63"),
])
def test_a_bad_inventory_is_refused_with_its_reason(inventory, says):
    with pytest.raises(ValueError) as err:
        parse_inventory(inventory, Limits())
    assert says in str(err.value)


def test_nan_utilization_is_not_idle():
    [line] = gpu_cost_lines(closed_windows([np.nan], 10), {}, TABLE, "spot", 5.0)
    assert "idle_seconds=0.0" in line
