"""The simulator: reproducible, rhythmic, and every fault visible where and when declared."""

import numpy as np
import pytest

from mlpe.agent.scenario import parse
from mlpe.agent.sources.sim import COL, SimulatedGpus
from mlpe.v1 import metrics_pb2 as pb

HZ = 100


def run(text: str, seconds: float):
    sim = SimulatedGpus(parse(text), HZ)
    readings = [sim.read(k, k * 10**7) for k in range(int(seconds * HZ))]
    values = np.stack([r.values for r in readings])  # (ticks, gpus, fields)
    events = [(k, row, e) for k, r in enumerate(readings) for row, e in r.events]
    return sim, values, events


def col(values, field):
    return values[:, :, COL[field]]


def test_same_seed_same_series_other_seed_differs():
    _, a, _ = run("seed: 3\nnodes: 2", 2)
    _, b, _ = run("seed: 3\nnodes: 2", 2)
    _, c, _ = run("seed: 4\nnodes: 2", 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_blocks_equal_tick_by_tick():
    text = ("nodes: 2\nfaults:\n  - {kind: thermal_throttle, gpu: 1, at_s: 0.13, for_s: 0.2}\n"
            "  - {kind: gpu_lost, node: 1, gpu: 0, at_s: 0.05, for_s: 0.1}\n"
            "  - {kind: ecc_error, gpu: 2, at_s: 0.21}\n  - {kind: xid, gpu: 3, at_s: 0.3}")
    _, ticks, tick_events = run(text, 0.5)
    sim = SimulatedGpus(parse(text), HZ)
    blocks, block_events = [], []
    for k0 in range(0, 50, 10):
        values, events = sim.read_block(k0, np.arange(k0, k0 + 10) * 10**7)
        blocks.append(values)
        block_events += [(k0 + i, row, e) for i, row, e in events]
    np.testing.assert_array_equal(np.concatenate(blocks), ticks)
    assert sorted((k, r, e.kind) for k, r, e in block_events) == \
        sorted((k, r, e.kind) for k, r, e in tick_events)


def test_training_rhythm_warmup_and_idle_gap():
    _, v, _ = run("training: {step_time_s: 0.5, warmup_s: 2, idle_gaps: [{at_s: 4, for_s: 1}]}",
                  6)
    util = col(v, pb.GPU_UTIL)[:, 0]
    assert util[:50].mean() < util[250:350].mean()          # warm-up ramps
    steady = util[300:400]
    assert steady.max() > 90 and steady.min() < 40          # compute vs all-reduce
    assert np.all(util[410:490] == 0)                        # the idle gap
    assert util[550:].max() > 90


def test_thermal_throttle_on_one_gpu_from_onset():
    _, v, events = run("faults: [{kind: thermal_throttle, gpu: 3, at_s: 1, for_s: 2, "
                       "magnitude: 0.5}]", 4)
    clock = col(v, pb.GPU_SM_CLOCK)
    throttle = col(v, pb.GPU_THROTTLE_REASONS).astype(int)
    busy = col(v, pb.GPU_UTIL) > 90
    assert np.all(clock[150:250, 3][busy[150:250, 3]] < 1100)
    assert np.all(clock[150:250, 0][busy[150:250, 0]] > 1900)
    assert np.all(throttle[100:300, 3] & pb.THROTTLE_HW_THERMAL)
    assert not np.any(throttle[:100, 3] & pb.THROTTLE_HW_THERMAL)
    assert not np.any(throttle[300:, 3] & pb.THROTTLE_HW_THERMAL)
    kinds = {(k, row, e.kind) for k, row, e in events}
    assert (100, 3, pb.EVENT_THROTTLE) in kinds and (300, 3, pb.EVENT_THROTTLE) in kinds


def test_power_cap_clips_power():
    _, v, _ = run("training: {warmup_s: 0}\n"
                  "faults: [{kind: power_cap, gpu: 5, at_s: 0, magnitude: 0.5}]", 3)
    power = col(v, pb.GPU_POWER)
    assert power[:, 5].max() < 350 + 15 and power[:, 0].max() > 500
    assert np.all(col(v, pb.GPU_POWER_LIMIT)[:, 5] == 350)


@pytest.mark.parametrize(("kind", "event"), [("xid", pb.EVENT_XID),
                                             ("ecc_error", pb.EVENT_ECC_UNCORRECTED)])
def test_instant_faults_are_one_event_at_onset(kind, event):
    _, v, events = run(f"faults: [{{kind: {kind}, gpu: 1, at_s: 0.5, magnitude: 2}}]", 2)
    hits = [(k, row) for k, row, e in events if e.kind == event]
    assert hits == [(50, 1)]
    if kind == "ecc_error":
        ecc = col(v, pb.GPU_ECC_UNCORRECTED)[:, 1]
        assert ecc[49] == 0 and ecc[50] == 2 and ecc[-1] == 2


def test_memory_leak_grows_linearly():
    _, v, _ = run("faults: [{kind: memory_leak, gpu: 6, at_s: 1, magnitude: 100}]", 4)
    mem = col(v, pb.GPU_MEM_USED)
    assert mem[399, 6] - mem[100, 6] == pytest.approx(300, abs=2)
    assert mem[399, 0] == mem[100, 0]


def test_starvation_stall_and_link_drop():
    text = ("nodes: 2\nfaults:\n  - {kind: input_starvation, node: 1, gpu: all, at_s: 0}\n"
            "  - {kind: stall, node: 0, gpu: 0, at_s: 0}\n"
            "  - {kind: link_degradation, node: 0, gpu: 1, at_s: 0, magnitude: 0.8}")
    _, v, _ = run(text + "\ntraining: {warmup_s: 0}", 2)
    util = col(v, pb.GPU_UTIL)
    assert util[:, 8:].max() < 35 and util[:, 2].max() > 90
    assert np.all(util[:, 0] == 0)
    nvlink = col(v, pb.GPU_NVLINK_TX)
    assert nvlink[:, 1].mean() == pytest.approx(0.2 * nvlink[:, 2].mean(), rel=0.05)


def test_straggler_slows_itself_and_idles_its_peers_on_every_node():
    _, v, _ = run("nodes: 2\ntraining: {warmup_s: 0}\nfaults: [{kind: straggler, gpu: 2, "
                  "at_s: 0, magnitude: 0.1}]", 2)
    clock = col(v, pb.GPU_SM_CLOCK)
    util = col(v, pb.GPU_UTIL)
    assert clock[:, 2].mean() < 0.93 * clock[:, [0, 1, 3, 9]].mean(axis=0).min()
    for peer in (0, 3, 8, 15):  # node-mates and the other node's GPUs wait alike
        assert util[:, peer].mean() < 0.95 * util[:, 2].mean()


def test_clocks_spread_and_wander_a_little():
    _, v, _ = run("training: {warmup_s: 0}", 2)
    clock = col(v, pb.GPU_SM_CLOCK)
    assert clock.max() <= 1980 and clock.min() > 0.96 * 1980
    assert np.ptp(clock.mean(axis=0)) > 5  # not every GPU at the same clock


def test_checkpoint_and_eval_pauses():
    _, v, _ = run("training: {warmup_s: 0, idle_gaps: [{at_s: 0.5, for_s: 0.5, kind: "
                  "checkpoint}, {at_s: 1, for_s: 0.5, kind: eval}]}", 2)
    util, pcie_tx, nvlink = (col(v, f) for f in (pb.GPU_UTIL, pb.GPU_PCIE_TX, pb.GPU_NVLINK_TX))
    ckpt, ev = slice(55, 100), slice(105, 150)
    assert util[ckpt].max() < 10 and pcie_tx[ckpt].min() > 10_000 and nvlink[ckpt].max() == 0
    assert 60 < util[ev].mean() < 80 and nvlink[ev].max() < 10_000


def test_gpu_lost_is_nan_with_events():
    _, v, events = run("faults: [{kind: gpu_lost, gpu: 7, at_s: 1, for_s: 1}]", 3)
    assert np.isnan(v[100:200, 7]).all() and not np.isnan(v[:100, 7]).any()
    assert not np.isnan(v[200:, 7]).any()
    lost = [(k, e.kind) for k, row, e in events if row == 7 and e.kind != pb.EVENT_THROTTLE]
    assert lost == [(100, pb.EVENT_GPU_LOST), (200, pb.EVENT_GPU_RECOVERED)]


def test_inventory_and_devices():
    sim = SimulatedGpus(parse("nodes: 3\ngpus_per_node: 4"), HZ, node_prefix="rack1-")
    assert len(sim.devices) == 12
    assert sim.devices[5].node_id == "rack1-01" and sim.devices[5].index == 1
    assert len({d.uuid for d in sim.devices}) == 12
    gpus = sim.inventory()
    assert len(gpus) == 4 and len(gpus[0].nvlinks) == 3
