import numpy as np

from mlpe.cli import tail
from mlpe.common import batches
from mlpe.v1 import alerts_pb2
from mlpe.v1 import metrics_pb2 as pb


def test_node_batch_is_summarised_device_by_device():
    times = np.array([1_700_000_000_000_000_000, 1_700_000_000_010_000_000])
    raw = batches.encode(batches.join([
        batches.Batch("node-1", pb.DEVICE_KIND_GPU, 3, "GPU-x", 1, 7, 70, times,
                      {pb.GPU_POWER: np.array([300.0, 310.0]),
                       pb.GPU_TEMP: np.array([np.nan, np.nan])},
                      [pb.DeviceEvent(time_ns=1, kind=pb.EVENT_XID, code=79)]),
        batches.Batch("node-1", pb.DEVICE_KIND_GPU, 4, "GPU-y", 1, 8, 80, times,
                      {pb.GPU_POWER: np.array([200.0, 200.0]),
                       pb.GPU_TEMP: np.array([50.0, 51.0])})]))
    d = tail.describe("mlpe.metrics.gpu", b"node-1", raw)
    assert (d["node"], d["samples"]) == ("node-1", 2)
    first, second = d["devices"]
    assert (first["device"], first["batch_seq"], second["device"]) == (3, 7, 4)
    assert first["fields"]["power"] == {"last": 310.0, "mean": 305.0, "min": 300.0,
                                        "max": 310.0}
    assert first["fields"]["temp"] == {"last": None}
    assert second["fields"]["temp"]["last"] == 51.0 and not second["events"]
    one, two = tail.render(d).splitlines()
    assert "node-1 dev3 seq=7 n=2 power=310.0" in one and "EVENT_XID" in one
    assert "node-1 dev4 seq=8 n=2 power=200.0" in two


def test_undecodable_message_is_reported_not_raised():
    d = tail.describe("mlpe.metrics.gpu", b"k", b"\xff\xfe garbage")
    assert "not a MetricBatch" in d["error"]
    assert "UNDECODABLE" in tail.render(d)


def test_other_topics_decode_their_message():
    alert = alerts_pb2.Alert(fingerprint="f1", rule="gpu_hot", labels={"node": "n1"})
    d = tail.describe("mlpe.alerts", b"f1", alert.SerializeToString())
    assert d["rule"] == "gpu_hot" and d["labels"] == {"node": "n1"}
