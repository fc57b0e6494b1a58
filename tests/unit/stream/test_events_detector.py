import numpy as np

from mlpe.common import batches
from mlpe.stream.detectors.events import detect
from mlpe.v1 import alerts_pb2 as al
from mlpe.v1 import metrics_pb2 as pb


def batch_with(*events) -> batches.Batch:
    return batches.Batch("node-7", pb.DEVICE_KIND_GPU, 3, "GPU-x", 1, 0, 0,
                         np.array([1_700_000_000 * 10**9]), {}, list(events))


def test_xid_is_a_critical_alert_with_its_meaning():
    [a] = detect(batch_with(pb.DeviceEvent(time_ns=5, kind=pb.EVENT_XID, code=79)), now_ns=9)
    assert (a.rule, a.severity, a.state) == ("gpu_xid", al.SEVERITY_CRITICAL, al.ALERT_FIRING)
    assert a.labels == {"node": "node-7", "gpu": "3"}
    assert a.summary == "Xid 79 on GPU 3 on node-7"
    assert "fallen off the bus" in a.explanation
    assert (a.starts_at_ns, a.detected_at_ns, a.detector) == (5, 9, "event")


def test_same_event_same_fingerprint_replay_safe():
    e = pb.DeviceEvent(time_ns=5, kind=pb.EVENT_ECC_UNCORRECTED, code=2)
    assert detect(batch_with(e), 1)[0].fingerprint == detect(batch_with(e), 2)[0].fingerprint


def test_throttle_mask_fires_set_reasons_and_resolves_clear_ones():
    mask = pb.THROTTLE_HW_THERMAL | pb.THROTTLE_SW_THERMAL
    alerts = detect(batch_with(pb.DeviceEvent(time_ns=5, kind=pb.EVENT_THROTTLE, code=mask)), 6)
    state = {a.rule: a.state for a in alerts}
    assert state["gpu_throttle_hw_thermal"] == al.ALERT_FIRING
    assert state["gpu_throttle_sw_thermal"] == al.ALERT_FIRING
    assert state["gpu_throttle_hw_slowdown"] == al.ALERT_RESOLVED
    cleared = detect(batch_with(pb.DeviceEvent(time_ns=7, kind=pb.EVENT_THROTTLE, code=0)), 8)
    fired = {a.fingerprint for a in alerts if a.state == al.ALERT_FIRING}
    assert fired <= {a.fingerprint for a in cleared if a.state == al.ALERT_RESOLVED}


def test_with_known_masks_only_changed_reasons_alert():
    masks: dict = {}
    thermal = pb.THROTTLE_HW_THERMAL | pb.THROTTLE_SW_THERMAL

    def rules(code, t):
        event = pb.DeviceEvent(time_ns=t, kind=pb.EVENT_THROTTLE, code=code)
        return {(a.rule, a.state) for a in detect(batch_with(event), t, masks)}

    assert len(rules(thermal, 1)) == 4  # first event: every reason stated
    assert rules(thermal | pb.THROTTLE_HW_SLOWDOWN, 2) == {
        ("gpu_throttle_hw_slowdown", al.ALERT_FIRING)}
    assert rules(pb.THROTTLE_GPU_IDLE, 3) == {
        ("gpu_throttle_hw_thermal", al.ALERT_RESOLVED),
        ("gpu_throttle_sw_thermal", al.ALERT_RESOLVED),
        ("gpu_throttle_hw_slowdown", al.ALERT_RESOLVED)}
    assert rules(0, 4) == set()  # idle cleared: no reason of ours changed


def test_idle_and_power_cap_bits_do_not_alert():
    mask = pb.THROTTLE_GPU_IDLE | pb.THROTTLE_SW_POWER_CAP
    alerts = detect(batch_with(pb.DeviceEvent(time_ns=5, kind=pb.EVENT_THROTTLE, code=mask)), 6)
    assert all(a.state == al.ALERT_RESOLVED for a in alerts)


def test_lost_then_recovered_share_a_fingerprint():
    lost, back = detect(batch_with(pb.DeviceEvent(time_ns=1, kind=pb.EVENT_GPU_LOST, code=15),
                                   pb.DeviceEvent(time_ns=2, kind=pb.EVENT_GPU_RECOVERED)), 3)
    assert (lost.state, back.state) == (al.ALERT_FIRING, al.ALERT_RESOLVED)
    assert lost.fingerprint == back.fingerprint


def test_alert_becomes_an_annotation_point():
    from mlpe.stream.influx import alert_line

    [a] = detect(batch_with(pb.DeviceEvent(time_ns=5, kind=pb.EVENT_XID, code=79)), now_ns=9)
    line = alert_line(a)
    head, _, ts = line.rpartition(" ")
    assert head.startswith("alert,rule=gpu_xid,severity=SEVERITY_CRITICAL,gpu=3,node=node-7 ")
    assert 'state="firing"' in line and 'summary="Xid 79 on GPU 3 on node-7"' in line
    assert ts == "5"
