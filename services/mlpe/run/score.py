"""Alerts scored against the faults a scenario injected (the ground truth): what
`mlpe run` reports for its fleet and `mlpe bench detect` for its scenarios.

- an incident is one fault: its node (or, for faults of the whole training job,
  the job), from onset to its end plus --grace seconds;
- a firing alert in a notification is a true positive when it falls in an
  incident's time and names its node, or its job without a node; otherwise it
  is a false alarm (every alert from a fault-free scenario is one);
- recall per fault type = incidents with at least one true alert / incidents;
  delay = first true alert received - onset;
- precision = true alerts / all firing alerts; per fault type, the share of
  alerts received during its incidents that name the right node or job;
- recall and delays also per grade: fault type, magnitude and scope (one GPU, a whole
  node, the job), e.g. "straggler 0.1 gpu", "link_degradation 0.3 node".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpe.agent.scenario import TRAINING_ONLY_KINDS, load

# Faults a detector can only confirm over time (a trend, a sustained drop): the delay
# target is for the others.
GRADUAL = {"memory_leak", "slow_steps"}
INSTANT_S = 1.0      # how long an instantaneous fault (Xid, ECC, NaN loss) "lasts"
UNGRADED = {"xid", "stall", "gpu_lost", "nan_loss"}  # magnitude is a code, or unused


@dataclass
class Incident:
    scenario: str
    kind: str
    node: str | None      # None: the whole training job
    job: str
    onset: float          # Unix seconds
    end: float
    first_alert: float | None = None
    grade: str = ""       # "<kind> <magnitude> <gpu|node|job>"; the kind alone if ungraded


@dataclass
class Received:
    at: float             # Unix seconds the sink got the message
    scenario: str | None
    rule: str
    detector: str
    labels: dict[str, str]
    incident: Incident | None = None


def incidents_of(scenario_file: Path, prefix: str, started_s: float, grace: float):
    s = load(str(scenario_file))
    job = f"{prefix}-job"
    out = []
    for fault in s.faults:
        node = None if fault.kind in TRAINING_ONLY_KINDS else f"{prefix}-{fault.node:02d}"
        onset = started_s + fault.at_s
        out.append(Incident(scenario_file.stem, fault.kind, node, job, onset,
                            onset + (fault.for_s or INSTANT_S) + grace, grade=grade_of(fault)))
    return out


def grade_of(fault) -> str:
    if fault.kind in UNGRADED:
        return fault.kind
    scope = "job" if fault.kind in TRAINING_ONLY_KINDS else \
        "gpu" if fault.gpu is not None else "node"
    return f"{fault.kind} {fault.magnitude:g} {scope}"


def score(incidents: list[Incident], received: list[Received]) -> dict:
    """Match alerts to incidents; the figures of the module docstring."""
    for r in received:
        for inc in incidents:
            if inc.scenario != r.scenario or not inc.onset - 0.5 <= r.at <= inc.end:
                continue
            node = r.labels.get("node")
            if (node is None and r.labels.get("job") == inc.job) or \
                    (inc.node is None and r.labels.get("job") == inc.job) or \
                    (node is not None and node == inc.node):
                r.incident = inc
                if inc.first_alert is None or r.at < inc.first_alert:
                    inc.first_alert = r.at
                break
    true = [r for r in received if r.incident is not None]
    false = [r for r in received if r.incident is None]
    per_fault = {}
    for kind in sorted({i.kind for i in incidents}):
        ours = [i for i in incidents if i.kind == kind]
        delays = [i.first_alert - i.onset for i in ours if i.first_alert is not None]
        during = [r for r in received if any(
            r.scenario == i.scenario and i.onset - 0.5 <= r.at <= i.end for i in ours)]
        right = [r for r in during if r.incident is not None and r.incident.kind == kind]
        per_fault[kind] = {
            "incidents": len(ours), "detected": len(delays),
            "recall": round(len(delays) / len(ours), 3),
            "precision": round(len(right) / len(during), 3) if during else None,
            "alerts": len(right),
            "delay_p50_s": _pct(delays, 50), "delay_p99_s": _pct(delays, 99),
            "detectors": sorted({r.detector for r in right}),
        }
    per_grade = {}
    for grade in sorted({i.grade or i.kind for i in incidents}):
        ours = [i for i in incidents if (i.grade or i.kind) == grade]
        delays = [i.first_alert - i.onset for i in ours if i.first_alert is not None]
        per_grade[grade] = {
            "incidents": len(ours), "detected": len(delays),
            "recall": round(len(delays) / len(ours), 3),
            "delay_p50_s": _pct(delays, 50),
            "delay_max_s": round(max(delays), 2) if delays else None,
        }
    sudden = [i.first_alert - i.onset for i in incidents
              if i.first_alert is not None and i.kind not in GRADUAL]
    every = [i.first_alert - i.onset for i in incidents if i.first_alert is not None]
    return {
        "precision": round(len(true) / len(received), 3) if received else None,
        "recall": round(sum(i.first_alert is not None for i in incidents) / len(incidents), 3)
        if incidents else None,
        "delay_p50_s": _pct(sudden, 50), "delay_p99_s": _pct(sudden, 99),
        "delay_all_p50_s": _pct(every, 50), "delay_all_p99_s": _pct(every, 99),
        "false_alarms": len(false),
        "false_alarm_rules": sorted({f"{r.rule} ({r.scenario})" for r in false}),
        "alerts": len(received), "incidents": len(incidents), "per_fault": per_fault,
        "per_grade": per_grade,
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None
