"""Columnar batches: encode/decode round trips (property-based) and specific refusals."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mlpe.common import batches
from mlpe.v1 import metrics_pb2 as pb

FIELDS = st.lists(st.sampled_from(batches.GPU_FIELDS + batches.HOST_FIELDS), unique=True,
                  max_size=12)


@st.composite
def a_batch(draw):
    n = draw(st.integers(0, 40))
    start = draw(st.integers(1_600_000_000 * 10**9, 1_900_000_000 * 10**9))
    steps = draw(arrays(np.int64, n, elements=st.integers(0, 10**9)))
    times = start + np.cumsum(steps // 1000 * 1000) if n else np.zeros(0, dtype=np.int64)
    columns = {}
    for f in draw(FIELDS):
        dtype = np.float64 if batches.value_type(f) == pb.VALUE_TYPE_F64 else np.float32
        columns[f] = draw(arrays(dtype, n, elements=st.floats(allow_nan=True, width=32)))
    return batches.Batch(
        node_id=draw(st.text(min_size=1, max_size=20)),
        device_kind=draw(st.sampled_from([pb.DEVICE_KIND_GPU, pb.DEVICE_KIND_HOST])),
        device_index=draw(st.integers(0, 63)),
        device_uuid=draw(st.text(max_size=40)),
        agent_epoch_ns=draw(st.integers(0, 2**62)),
        batch_seq=draw(st.integers(0, 2**62)),
        first_sample_seq=draw(st.integers(0, 2**62)),
        timestamps_ns=times,
        columns=columns,
        events=[pb.DeviceEvent(time_ns=int(start), kind=pb.EVENT_XID, code=79, detail="x")]
        if draw(st.booleans()) else [],
        sample_hz=draw(st.floats(0.1, 1000)),
    )


def assert_same(back, batch):
    """A decoded NodeBatch of one device against the Batch it was made of."""
    assert back.devices == 1
    back = back.device(0)
    for name in ("node_id", "device_kind", "device_index", "device_uuid", "agent_epoch_ns",
                 "batch_seq", "first_sample_seq", "events", "sample_hz"):
        assert getattr(back, name) == getattr(batch, name), name
    np.testing.assert_array_equal(back.timestamps_ns, batch.timestamps_ns)
    assert set(back.columns) == set(batch.columns)
    for f, values in batch.columns.items():
        np.testing.assert_array_equal(back.columns[f], values)  # NaN == NaN here
        assert back.columns[f].dtype.itemsize == values.dtype.itemsize


@settings(max_examples=200, deadline=None)
@given(a_batch())
def test_round_trip(batch):
    assert_same(batches.decode(batches.encode(batch)), batch)


def _good() -> pb.MetricBatch:
    raw = batches.encode(batches.Batch("n1", pb.DEVICE_KIND_GPU, 0, "", 1, 0, 0,
                                       np.array([10**18, 10**18 + 10**7]),
                                       {pb.GPU_POWER: np.array([1.0, 2.0])}))
    return pb.MetricBatch.FromString(raw)


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda m: m.ClearField("node_id"), "node_id is empty"),
    (lambda m: setattr(m, "device_kind", 0), "is not GPU or HOST"),
    (lambda m: setattr(m, "time_offsets_us", b"\x00" * 7), "not a multiple of 4"),
    (lambda m: setattr(m.series[0], "values", b"\x00" * 4), "GPU_POWER has 1 values, "
                                                            "1 devices x 2 timestamps need 2"),
    (lambda m: m.ClearField("devices"), "no devices"),
    (lambda m: m.devices.append(m.devices[0]), r"device indices \[0, 0\] repeat"),
    (lambda m: setattr(m.series[0], "field", 9999), "unknown field number 9999"),
    (lambda m: setattr(m.series[0], "type", 0), "GPU_POWER has no value type"),
    (lambda m: m.series.append(m.series[0]), "GPU_POWER appears twice"),
])
def test_invalid_batches_are_refused_with_the_reason(mutate, reason):
    message = _good()
    mutate(message)
    with pytest.raises(batches.BatchError, match=reason):
        batches.decode(message.SerializeToString())


def test_garbage_bytes():
    with pytest.raises(batches.BatchError, match="not a MetricBatch"):
        batches.decode(b"\xff\xff\xff\xff garbage")


def test_field_names_are_readable():
    assert batches.field_name(pb.GPU_POWER) == "power"
    assert batches.field_name(pb.HOST_NET_RX) == "net_rx"


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(1, 5), st.lists(st.sampled_from(batches.GPU_FIELDS),
                                                         unique=True, min_size=1))
def test_encode_nodes_matches_encode(samples, n_devices, fields):
    """The agent's fast path cuts each node out of one block: the same batches as
    encoding each node's devices one by one."""
    rng = np.random.default_rng(samples * 31 + n_devices)
    values = rng.normal(size=(samples, n_devices, len(fields))) * 1e3
    values[0, 0, 0] = np.nan
    times = 1_700_000_000_000_000_000 + np.arange(samples) * 10_000_000
    node_of = [f"n{d * 2 // n_devices}" for d in range(n_devices)]  # two nodes, in order
    events = [[pb.DeviceEvent(time_ns=int(times[0]), kind=pb.EVENT_XID, code=d)]
              for d in range(n_devices)]
    seqs = np.arange(n_devices) + 5
    nodes = []
    for node in dict.fromkeys(node_of):
        rows = np.array([d for d in range(n_devices) if node_of[d] == node])
        nodes.append((node, pb.DEVICE_KIND_GPU, rows, [
            pb.Device(index=int(d), uuid=f"GPU-{d}", batch_seq=int(seqs[d]),
                      first_sample_seq=int(seqs[d] * 10), events=events[d]) for d in rows]))
    raws = batches.encode_nodes(pb.MetricBatch(agent_epoch_ns=9, sample_hz=100.0), nodes,
                                times, values, tuple(fields))
    assert len(raws) == len(nodes)
    for (node, _, rows, _), raw in zip(nodes, raws, strict=True):
        want = batches.join([batches.Batch(
            node, pb.DEVICE_KIND_GPU, int(d), f"GPU-{d}", 9, int(seqs[d]), int(seqs[d] * 10),
            times, {f: values[:, d, i] for i, f in enumerate(fields)}, events[d], 100.0)
            for d in rows])
        got = batches.decode(raw)
        assert got.node_id == node and got.devices == len(rows)
        for d in range(len(rows)):
            assert_same(_one(got, d), _one(want, d).device(0))


def _one(node_batch, d):
    """Device d of a NodeBatch as a decoded batch of one device (for assert_same)."""
    return batches.decode(batches.encode(node_batch.device(d)))


def test_matrix_is_samples_by_devices_by_fields():
    times = np.array([10**18, 10**18 + 10**7, 10**18 + 2 * 10**7])
    node = batches.decode(batches.encode(batches.join([
        batches.Batch("n", pb.DEVICE_KIND_GPU, g, "", 1, 0, 0, times,
                      {pb.GPU_POWER: np.array([g, g + 1, g + 2], dtype=float),
                       pb.GPU_ENERGY: np.array([10.0 * g] * 3)}) for g in (0, 1)])))
    fields, matrix = node.matrix()
    assert fields == (pb.GPU_POWER, pb.GPU_ENERGY) and matrix.shape == (3, 2, 2)
    np.testing.assert_array_equal(matrix[:, 1, 0], [1, 2, 3])
    np.testing.assert_array_equal(matrix[:, 1, 1], [10, 10, 10])
    picked = node.select(np.array([False, True]))
    assert picked.device_indices.tolist() == [1] and picked.matrix()[1].shape == (3, 1, 2)


def test_join_refuses_devices_that_differ():
    a = batches.Batch("n", pb.DEVICE_KIND_GPU, 0, "", 1, 0, 0, np.array([10**18]),
                      {pb.GPU_POWER: np.array([1.0])})
    b = batches.Batch("m", pb.DEVICE_KIND_GPU, 1, "", 1, 0, 0, np.array([10**18]),
                      {pb.GPU_POWER: np.array([1.0])})
    with pytest.raises(batches.BatchError, match="differ"):
        batches.join([a, b])
