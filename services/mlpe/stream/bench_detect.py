"""`mlpe bench detect`: fault scenarios through the real pipeline, scored at the webhook.

Every scenario file of --scenarios runs at once, one simulated fleet (agent
process) each: agents → Kafka → `mlpe stream` → mlpe.alerts → `mlpe notify` →
`mlpe webhook-sink`. What the sink receives is matched against the scenarios'
faults (the ground truth):

- an incident is one fault: its node (or, for faults of the whole training job,
  the job), from onset to its end plus --grace seconds;
- a firing alert in a notification is a true positive when it falls in an
  incident's time and names its node, or its job without a node; otherwise it
  is a false alarm (every alert from a fault-free scenario is one);
- recall per fault type = incidents with at least one true alert / incidents;
  delay = first true alert received - onset;
- precision = true alerts / all firing alerts; per fault type, the share of
  alerts received during its incidents that name the right node or job.

Scenario files without faults are the fault-free runs; put benign look-alikes in
them (warm-up, idle gaps).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpe.common.settings import Settings

DEFAULT_SCENARIOS = Path(__file__).resolve().parents[3] / "agents" / "scenarios" / "detect"
# Faults a detector can only confirm over time (a trend, a sustained drop): the delay
# target is for the others.
GRADUAL = {"memory_leak", "slow_steps"}
INSTANT_S = 1.0      # how long an instantaneous fault (Xid, ECC, NaN loss) "lasts"
TAIL_S = 20.0        # the fleet runs this long after its last fault or gap


def register(sub) -> None:
    p = sub.add_parser("detect", help="fault scenarios → pipeline → webhook: precision, "
                       "recall, delay", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=str(DEFAULT_SCENARIOS), metavar="DIR",
                   help="directory of scenario YAML files, run together (default: "
                   "agents/scenarios/detect)")
    p.add_argument("--hz", type=float, default=100.0, help="GPU samples per second (100)")
    p.add_argument("--workers", type=int, default=1, help="stream worker processes (1)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds after a fault ends that its alerts still count (10)")
    p.add_argument("--details", default=None, metavar="FILE",
                   help="write every incident and every firing alert received, with what it "
                   "was matched to, as JSON lines")
    p.set_defaults(bench=bench_detect)


@dataclass
class Incident:
    scenario: str
    kind: str
    node: str | None      # None: the whole training job
    job: str
    onset: float          # Unix seconds
    end: float
    first_alert: float | None = None


@dataclass
class Received:
    at: float             # Unix seconds the sink got the message
    scenario: str | None
    rule: str
    detector: str
    labels: dict[str, str]
    incident: Incident | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the webhook sink exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the webhook sink did not listen on port {port} in {timeout:.0f} s")


def parse_message(body: str) -> list[tuple[str, str, dict[str, str], bool]]:
    """(rule title, detector, labels, firing) per alert of a Slack message that
    `mlpe notify` formatted (mlpe.notify.slack.format_message)."""
    blocks = json.loads(body).get("blocks", [])
    out = []
    for section, context in zip(blocks[::2], blocks[1::2], strict=False):
        first_line = section["text"]["text"].split("\n")[0]  # ":icon: *[RESOLVED: ]title*"
        title = first_line.split(" *", 1)[-1].rstrip("*")
        resolved = title.startswith("RESOLVED: ")
        detector, labels_text, *_ = context["elements"][0]["text"].split(" · ")
        labels = dict(pair.split("=", 1) for pair in labels_text.split(", ") if "=" in pair)
        out.append((title.removeprefix("RESOLVED: "), detector, labels, not resolved))
    return out


def incidents_of(scenario_file: Path, prefix: str, started_s: float, grace: float):
    from mlpe.agent.scenario import TRAINING_ONLY_KINDS, load

    s = load(str(scenario_file))
    job = f"{prefix}-job"
    out = []
    for fault in s.faults:
        node = None if fault.kind in TRAINING_ONLY_KINDS else f"{prefix}-{fault.node:02d}"
        onset = started_s + fault.at_s
        out.append(Incident(scenario_file.stem, fault.kind, node, job, onset,
                            onset + (fault.for_s or INSTANT_S) + grace))
    return out


def duration_of(scenario_file: Path) -> float:
    from mlpe.agent.scenario import load

    s = load(str(scenario_file))
    ends = [f.at_s + (f.for_s or INSTANT_S) for f in s.faults]
    ends += [g.at_s + g.for_s for g in s.idle_gaps] + [s.warmup_s]
    return max(ends) + TAIL_S


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
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def bench_detect(args, settings: Settings) -> dict:
    from mlpe.stack.kafka import kafka_reachable
    from mlpe.stream.bench import wait_group_stable

    files = sorted(Path(args.scenarios).glob("*.yaml"))
    if not files:
        raise RuntimeError(f"--scenarios {args.scenarios}: no *.yaml scenario files there")
    from mlpe.agent.scenario import ScenarioError

    try:
        durations = {f: duration_of(f) for f in files}  # validates every file first
    except ScenarioError as err:
        raise RuntimeError(str(err)) from None
    if not kafka_reachable(settings.kafka_bootstrap):
        raise RuntimeError(f"Kafka is not reachable at {settings.kafka_bootstrap}: run "
                           "`mlpe stack up` (or `make up`)")
    run_id = uuid.uuid4().hex[:6]
    port = _free_port()
    env = {**os.environ, "MLPE_LOG_LEVEL": "warning", "MLPE_STREAM_START": "latest",
           "MLPE_STREAM_APP_ID": f"bench-detect-{run_id}",
           "MLPE_NOTIFY_GROUP_ID": f"bench-detect-notify-{run_id}",
           "MLPE_NOTIFY_REDIS_PREFIX": f"mlpe:bench-detect:{run_id}",
           "MLPE_NOTIFY_START": "latest",
           "MLPE_SLACK_WEBHOOK_URL": f"http://127.0.0.1:{port}/bench"}
    total = max(durations.values())
    print(f"bench detect: {len(files)} scenario(s) from {args.scenarios}, run together for "
          f"{total:.0f} s at {args.hz:g} Hz", flush=True)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="mlpe-bench-detect-") as tmp:
        work = Path(tmp)

        def start(name: str, *argv: str) -> subprocess.Popen:
            proc = subprocess.Popen([sys.executable, "-m", "mlpe.cli", *argv], env=env,
                                    stdout=(work / f"{name}.log").open("wb"),
                                    stderr=subprocess.STDOUT)
            procs.append(proc)
            return proc

        try:
            record = work / "received.jsonl"
            sink = start("sink", "webhook-sink", "--port", str(port), "--record", str(record))
            _wait_port(port, sink)
            notify = start("notify", "notify")
            workers = [start(f"stream{i}", "stream") for i in range(args.workers)]
            wait_group_stable(settings.kafka_bootstrap, env["MLPE_STREAM_APP_ID"],
                              args.workers, workers)
            wait_group_stable(settings.kafka_bootstrap, env["MLPE_NOTIFY_GROUP_ID"], 1,
                              [notify])
            agents = {f: start(f"agent-{f.stem}", "agent", "--source", "sim", "--scenario",
                               str(f), "--hz", f"{args.hz:g}",
                               "--node-id", f"detect-{f.stem}-{run_id}",
                               # One length for all: a fleet that stops early would
                               # look stalled to the others' clock.
                               "--duration", f"{total:g}",
                               "--spool-dir", str(work / f"spool-{f.stem}"),
                               "--stats-json", str(work / f"{f.stem}.json"))
                      for f in files}
            started = time.monotonic()
            while any(a.poll() is None for a in agents.values()):
                elapsed = time.monotonic() - started
                if elapsed > total + 60:
                    raise RuntimeError("agents did not stop after their --duration")
                print(f"  {elapsed:5.0f} s / {total:.0f} s, notifications so far: "
                      f"{_count(record)}", flush=True)
                time.sleep(min(30.0, max(total - elapsed, 1.0)))
            failed = [f.name for f, a in agents.items() if a.returncode != 0]
            if failed:
                raise RuntimeError(f"agent(s) failed: {failed}; logs in {work}")
            time.sleep(args.grace)  # let the last alerts travel
            stats = {f: json.loads((work / f"{f.stem}.json").read_text()) for f in files}
        except BaseException:
            for name in ("stream0", "notify"):
                log = work / f"{name}.log"
                if log.exists():
                    print(f"--- {name} log (tail) ---\n{log.read_text()[-3000:]}",
                          file=sys.stderr)
            raise
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        prefixes = {f: f"detect-{f.stem}-{run_id}" for f in files}
        incidents = [i for f in files for i in incidents_of(
            f, prefixes[f], stats[f]["started_ns"] / 1e9, args.grace)]
        received = []
        lines = record.read_text().splitlines() if record.exists() else []
        for line in lines:
            entry = json.loads(line)
            for title, detector, labels, firing in parse_message(entry["body"]):
                if not firing:
                    continue
                owner = labels.get("node") or labels.get("job") or ""
                scenario = next((f.stem for f, p in prefixes.items()
                                 if owner.startswith(p + "-")), None)
                rule = re.sub(r"\s+", " ", title)
                received.append(Received(entry["received_at"], scenario, rule, detector,
                                         labels))
    result = score(incidents, received)
    if args.details:
        with open(args.details, "w") as out:
            for i in incidents:
                out.write(json.dumps({"incident": i.kind, "scenario": i.scenario,
                                      "node": i.node, "job": i.job, "onset": i.onset,
                                      "first_alert_after_s": None if i.first_alert is None
                                      else round(i.first_alert - i.onset, 2)}) + "\n")
            for r in received:
                out.write(json.dumps({
                    "alert": r.rule, "detector": r.detector, "labels": r.labels,
                    "scenario": r.scenario, "received_at": r.at,
                    "matched": None if r.incident is None else r.incident.kind,
                    "after_onset_s": None if r.incident is None else
                    round(r.at - r.incident.onset, 2)}) + "\n")
    for kind, row in result["per_fault"].items():
        print(f"  {kind:17s} recall {row['recall']:.2f} ({row['detected']}/{row['incidents']})"
              f"  precision {row['precision']}  delay p50 {row['delay_p50_s']} s / p99 "
              f"{row['delay_p99_s']} s  via {','.join(row['detectors'])}", flush=True)
    print(f"  overall: precision {result['precision']}, recall {result['recall']}, sudden-fault "
          f"delay p50 {result['delay_p50_s']} s / p99 {result['delay_p99_s']} s, false alarms "
          f"{result['false_alarms']} {result['false_alarm_rules']}", flush=True)
    return {"bench": "detect", "scenarios": len(files), "hz": args.hz, **result}


def _count(record: Path) -> int:
    return len(record.read_text().splitlines()) if record.exists() else 0
