"""Event detector: Xid, uncorrected ECC, throttling and lost GPUs become alerts at once.

Stateless on purpose: every decision comes from the batch's own events, so a
replay after a crash makes the same alerts with the same fingerprints, which the
notifier deduplicates. Throttle events carry the full new reason mask: each set
reason fires, each clear one resolves (a resolve of something never fired is
dropped by the notifier).
"""

from __future__ import annotations

from mlpe.common import batches
from mlpe.common.alerts import fingerprint
from mlpe.v1 import alerts_pb2 as al
from mlpe.v1 import metrics_pb2 as pb

# What operators need to know about the Xids seen most on training fleets.
XID_MEANING = {
    13: "graphics engine exception (often an application bug or bad memory access)",
    31: "GPU memory page fault (usually the application; can be a driver bug)",
    43: "GPU stopped processing (the job's context was reset)",
    45: "preemptive cleanup after a previous error (follows another Xid)",
    48: "double-bit ECC error: memory is corrupt; drain the node and reset the GPU",
    61: "internal micro-controller breakpoint/warning: GPU needs a reset",
    62: "internal micro-controller halt: GPU needs a reset",
    63: "ECC page retirement recorded: watch for more",
    64: "ECC page retirement failed: GPU should be replaced",
    74: "NVLink error: check the link and the peer GPU",
    79: "GPU has fallen off the bus: it is unreachable until the node is rebooted",
    92: "high single-bit ECC error rate",
    94: "contained ECC error: the affected application was stopped",
    95: "uncontained ECC error: every application on the GPU is affected; reset needed",
    119: "GSP timeout: the GPU firmware stopped responding",
    120: "GSP error: the GPU firmware reported a fault",
}
THROTTLE_REASONS = {  # bit: (name, severity, why it matters)
    pb.THROTTLE_HW_THERMAL: ("hw_thermal", al.SEVERITY_CRITICAL,
                             "the GPU is too hot and hardware cut its clocks"),
    pb.THROTTLE_SW_THERMAL: ("sw_thermal", al.SEVERITY_WARNING,
                             "the driver lowered clocks to keep temperature in limits"),
    pb.THROTTLE_HW_SLOWDOWN: ("hw_slowdown", al.SEVERITY_CRITICAL,
                              "hardware slowdown (thermal or power brake) halved clocks or more"),
    pb.THROTTLE_HW_POWER_BRAKE: ("hw_power_brake", al.SEVERITY_CRITICAL,
                                 "an external power brake (PSU or chassis) is asserted"),
}
# Not here: SW power cap. A busy H100 sits at its power limit as a matter of course;
# a *lowered* limit is what matters, and that is a rule on GPU_POWER_LIMIT with a hold.


def _alert(batch: batches.Batch, event: pb.DeviceEvent, rule: str, severity: int,
           state: int, summary: str, explanation: str, key: str, value: float = 0.0,
           threshold: float = 0.0) -> al.Alert:
    gpu = str(batch.device_index)
    return al.Alert(
        fingerprint=fingerprint(rule, batch.node_id, gpu, key), rule=rule, detector="event",
        severity=severity, state=state, labels={"node": batch.node_id, "gpu": gpu},
        value=value, threshold=threshold, starts_at_ns=event.time_ns,
        ends_at_ns=event.time_ns if state == al.ALERT_RESOLVED else 0, summary=summary,
        explanation=explanation)


def detect(batch: batches.Batch, now_ns: int,
           throttle_masks: dict | None = None) -> list[al.Alert]:
    """Alerts for the events of one batch, in event order. `throttle_masks` ({(node, gpu):
    last mask}, kept by the caller) limits throttle alerts to the reasons that changed;
    without a known last mask (first event, or after a restart) every reason is stated."""
    out = []
    where = f"GPU {batch.device_index} on {batch.node_id}"
    for e in batch.events:
        if e.kind == pb.EVENT_XID:
            meaning = XID_MEANING.get(e.code, "see NVIDIA's Xid catalogue")
            out.append(_alert(batch, e, "gpu_xid", al.SEVERITY_CRITICAL, al.ALERT_FIRING,
                              f"Xid {e.code} on {where}", f"Xid {e.code}: {meaning}.",
                              key=str(e.code), value=e.code))
        elif e.kind == pb.EVENT_ECC_UNCORRECTED:
            out.append(_alert(batch, e, "gpu_ecc_uncorrected", al.SEVERITY_CRITICAL,
                              al.ALERT_FIRING, f"Uncorrected ECC errors on {where}",
                              f"{e.code} new uncorrected ECC error(s): memory contents cannot "
                              "be trusted; drain the node and reset the GPU.", key="ecc",
                              value=e.code))
        elif e.kind == pb.EVENT_GPU_LOST:
            out.append(_alert(batch, e, "gpu_lost", al.SEVERITY_CRITICAL, al.ALERT_FIRING,
                              f"{where} stopped answering",
                              f"The driver cannot reach the GPU ({e.detail}); jobs on it will "
                              "hang or fail.", key="lost"))
        elif e.kind == pb.EVENT_GPU_RECOVERED:
            out.append(_alert(batch, e, "gpu_lost", al.SEVERITY_CRITICAL, al.ALERT_RESOLVED,
                              f"{where} answers again", "The GPU is reachable again.",
                              key="lost"))
        elif e.kind == pb.EVENT_THROTTLE:
            device = (batch.node_id, batch.device_index)
            last = None if throttle_masks is None else throttle_masks.get(device)
            if throttle_masks is not None:
                throttle_masks[device] = e.code
            for bit, (name, severity, why) in THROTTLE_REASONS.items():
                on = bool(e.code & bit)
                if last is not None and on == bool(last & bit):
                    continue  # unchanged: no alert, no "no longer throttled" noise
                out.append(_alert(
                    batch, e, f"gpu_throttle_{name}", severity,
                    al.ALERT_FIRING if on else al.ALERT_RESOLVED,
                    f"{where} throttled: {name.replace('_', ' ')}" if on else
                    f"{where} no longer throttled ({name.replace('_', ' ')})",
                    f"Clock-throttle reason {name}: {why}." if on else
                    f"Throttle reason {name} cleared.", key=name, value=e.code))
    for a in out:
        a.detected_at_ns = now_ns
    return out
