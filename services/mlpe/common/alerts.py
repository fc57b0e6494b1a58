"""What every detector's alerts have in common: a stable fingerprint and one constructor."""

from __future__ import annotations

import hashlib

from mlpe.v1 import alerts_pb2 as al

FIRING, RESOLVED = al.ALERT_FIRING, al.ALERT_RESOLVED
WARNING, CRITICAL = al.SEVERITY_WARNING, al.SEVERITY_CRITICAL


def fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def build(detector: str, rule: str, severity: int, firing: bool, labels: dict[str, str],
          value: float, threshold: float, since_ns: int, now_ns: int, summary: str,
          explanation: str) -> al.Alert:
    """An alert whose fingerprint is the rule plus its labels: the same condition firing
    again, or replayed after a crash, is recognisably the same alert."""
    key = [rule] + [f"{k}={labels[k]}" for k in sorted(labels)]
    return al.Alert(
        fingerprint=fingerprint(*key), rule=rule, detector=detector, severity=severity,
        state=FIRING if firing else RESOLVED, labels=labels, value=float(value),
        threshold=float(threshold), starts_at_ns=since_ns, ends_at_ns=0 if firing else now_ns,
        detected_at_ns=now_ns, summary=summary, explanation=explanation)
