"""Canned inputs for `mlpe run`'s summary and report, as the run would leave them:
webhook deliveries formatted by `mlpe notify`'s own format_message, the fleet agent's
stats, the job, the plan, the recovery, the advice."""

from __future__ import annotations

import json

from mlpe.notify.slack import format_message
from mlpe.run.orchestrate import SCENARIO
from mlpe.run.summary import build_summary
from mlpe.v1 import alerts_pb2 as pb

FLEET = "runabc123"
JOB = "j-42"
STARTED = 1_700_000_000.0  # Unix seconds the fleet started
KILLED = STARTED + 30.0    # and rank 1 was killed


def alert(summary: str, labels: dict[str, str], *, resolved: bool = False) -> pb.Alert:
    return pb.Alert(fingerprint=summary, rule=summary.split()[0], detector="rule",
                    severity=pb.SEVERITY_WARNING, labels=labels, value=91, threshold=85,
                    state=pb.ALERT_RESOLVED if resolved else pb.ALERT_FIRING,
                    starts_at_ns=int(STARTED * 1e9), summary=summary,
                    explanation="what, how far from normal, why it matters")


def delivery(at: float, *alerts: pb.Alert) -> dict:
    """One line of the webhook sink's record."""
    return {"path": "/run", "received_at": at, "body": json.dumps(format_message(list(alerts)))}


# run.yaml's faults: a thermal throttle on node 00 at 25 s, an Xid on node 01 at 40 s, a
# straggler on node 01 at 55 s (missed here).
RECORDS = [
    delivery(STARTED + 10.0, alert("power spike on GPU 1", {"node": f"{FLEET}-01", "gpu": "1"})),
    delivery(STARTED + 27.5, alert("thermal throttle on GPU 3",
                                   {"node": f"{FLEET}-00", "gpu": "3"})),
    delivery(STARTED + 41.2, alert("xid 79 on GPU 5", {"node": f"{FLEET}-01", "gpu": "5"}),
             alert("not ours", {"node": "elsewhere-00", "gpu": "0"})),
    delivery(KILLED - 1.5, alert("slow steps on j-42", {"job": JOB}, resolved=True)),
    delivery(KILLED + 3.0, alert("loss spike on j-42", {"job": JOB, "rank": "0"})),
    delivery(STARTED + 70.0, alert("thermal throttle on GPU 3",
                                   {"node": f"{FLEET}-00", "gpu": "3"}, resolved=True)),
]
RECOVERY = {"kill_to_first_step_s": 6.4, "resumed_from": 25, "killed_at_step": 40}
PLAN = {"model": "llama3-8b", "cluster": "2x8xH100", "best": "tp 8 · pp 1 · dp 2"}
ADVICE = {JOB: ["[warning] raise the micro batch — <script>alert(1)</script> at 40 % util"],
          f"{FLEET}-job": ["(advice unavailable: no data)"]}


def summary_of(records=RECORDS, duration_s: float = 90.0, **changes) -> dict:
    inputs = dict(run_id="abc123", scenario=SCENARIO, fleet=FLEET, duration_s=duration_s,
                  records=records,
                  agent_stats={"started_ns": int(STARTED * 1e9), "values_sent": 123_456},
                  job={"id": JOB, "state": "completed", "steps": 120, "loss": 4.2121,
                       "restarts": 1},
                  recovery=RECOVERY, plan=PLAN, advice=ADVICE, killed_wall=KILLED)
    return build_summary(**{**inputs, **changes})


