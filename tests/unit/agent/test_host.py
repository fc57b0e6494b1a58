import numpy as np

from mlpe.agent.sources.host import COL, HostMetrics
from mlpe.v1 import metrics_pb2 as pb


def test_host_reading_is_one_device_with_sane_values():
    host = HostMetrics("node-a")
    assert [(d.node_id, d.kind) for d in host.devices] == [("node-a", pb.DEVICE_KIND_HOST)]
    row = host.read(0, 0).values
    assert row.shape == (1, len(host.fields))
    assert np.isfinite(row).all()
    assert 0 <= row[0, COL[pb.HOST_CPU_UTIL]] <= 100
    assert 0 < row[0, COL[pb.HOST_MEM_USED]] < row[0, COL[pb.HOST_MEM_TOTAL]]
    for field in (pb.HOST_DISK_READ, pb.HOST_DISK_WRITE, pb.HOST_NET_RX, pb.HOST_NET_TX):
        assert row[0, COL[field]] >= 0
