"""The main job's summary: built as plain data from what the run left behind (the
webhook sink's record, the fleet agent's stats, the job's state, the plan, the
recovery, the optimizer's advice), and printed separately.

The dict is what `mlpe run` prints as JSON on its last line and what the report shows;
building it needs no server, so the tests build it from canned inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

GRACE_S = 10.0  # how long after a fault ends an alert still counts as catching it


def read_webhook_records(path: Path) -> list[dict]:
    """The sink's record, one delivery a line ({"received_at", "body", ...}); none when
    the alerts went to a real Slack webhook instead."""
    return [json.loads(line) for line in path.read_text().splitlines()] \
        if path.exists() else []


def build_summary(*, run_id: str, scenario: Path, fleet: str, duration_s: float,
                  records: list[dict], agent_stats: dict, job: dict, recovery: dict,
                  plan: dict, advice: dict[str, list[str]], killed_wall: float) -> dict:
    """The summary dict. `job`: {"id", "state", "steps", "loss", "restarts"};
    `killed_wall`: Unix seconds rank 1 was killed, 0 if it never was."""
    from mlpe.notify.slack import parse_message
    from mlpe.run.score import Received, incidents_of, score

    received, on_job = [], []
    for entry in records:
        for title, detector, labels, firing in parse_message(entry["body"]):
            if firing and (labels.get("node", "").startswith(fleet) or
                           labels.get("job", "").startswith(fleet)):
                received.append(Received(entry["received_at"], scenario.stem, title,
                                         detector, labels))
            elif labels.get("job") == job["id"]:  # the real job: not scored, but shown
                on_job.append({"alert": title, "firing": firing, "s_after_kill": round(
                    entry["received_at"] - killed_wall, 1) if killed_wall else None})
    started = agent_stats["started_ns"] / 1e9
    # Faults scheduled after the fleet stopped (a short --duration) never happened.
    incidents = [i for i in incidents_of(scenario, fleet, started, GRACE_S)
                 if i.onset < started + duration_s]
    scored = score(incidents, received)
    values = agent_stats.get("values_sent") or agent_stats.get("values") or \
        agent_stats.get("sent")
    return {
        "run": run_id, "values_ingested": values,
        "alerts": [{"rule": r.rule,
                    "delay_s": None if r.incident is None else round(r.at - r.incident.onset, 1),
                    "fault": None if r.incident is None else r.incident.kind,
                    "detector": r.detector, "labels": r.labels} for r in received],
        "fault_recall": scored["recall"], "false_alarms": scored["false_alarms"],
        "faults": [{"kind": i.kind, "node": i.node, "at_s": round(i.onset - started, 1),
                    "caught_after_s": None if i.first_alert is None else
                    round(i.first_alert - i.onset, 1)} for i in incidents],
        "job_alerts": on_job, "webhook_deliveries": len(records),
        "plan": plan,
        "job": {**job, **recovery},
        "advice": advice,
    }


def format_summary(summary: dict) -> str:
    """The summary as a person reads it on the console."""
    job, plan = summary["job"], summary["plan"]
    recall = summary["fault_recall"]
    caught = "n/a, none injected" if recall is None else f"{recall:.0%}"
    lines = ["", "== mlpe run: summary ==",
             f"values ingested: {summary['values_ingested']}",
             f"alerts: {len(summary['alerts'])} (faults caught {caught}, false alarms "
             f"{summary['false_alarms']}), webhook messages {summary['webhook_deliveries']}"]
    lines += [f"  - {a['rule']}" + (f" after {a['delay_s']} s" if a["delay_s"] else "")
              for a in summary["alerts"]]
    lines.append(f"alerts on the training job {job['id']} (not scored): "
                 f"{len(summary['job_alerts'])}")
    for a in summary["job_alerts"]:
        lines.append(f"  - {'' if a['firing'] else 'resolved: '}{a['alert']}"
                     f"{relative_to_kill(a['s_after_kill'], ' (', ')')}")
    lines.append(f"plan: {plan['model']} on {plan['cluster']}: {plan['best']}")
    recovered = f", recovered in {job['kill_to_first_step_s']} s" \
        if "kill_to_first_step_s" in job else ""
    lines.append(f"job {job['id']}: {job['state']} at step {job['steps']}, loss "
                 f"{job['loss']:.3f}, restarts {job['restarts']}{recovered}")
    for who, advice in summary["advice"].items():
        lines.append(f"advice for {who}:")
        lines += [f"  {line}" for line in advice[:4]]
    return "\n".join(lines)


def relative_to_kill(seconds: float | None, before: str = "", after: str = "") -> str:
    """"12.5 s after the kill" (or before), wrapped in before/after; "" when unknown."""
    if seconds is None:
        return ""
    return f"{before}{abs(seconds)} s {'after' if seconds >= 0 else 'before'} the kill{after}"


def print_summary(summary: dict) -> None:
    print(format_summary(summary), flush=True)
