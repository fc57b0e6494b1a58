"""`mlpe bench detect`: fault scenarios through the real pipeline, scored at the webhook.

Every scenario file of --scenarios runs at once, one simulated fleet (agent
process) each: agents → Kafka → `mlpe stream` → mlpe.alerts → `mlpe notify` →
`mlpe webhook-sink`. What the sink receives is matched against the scenarios'
faults (the ground truth):

How alerts are matched to faults: mlpe.run.score.

Scenario files without faults are the fault-free runs; put benign look-alikes in
them (warm-up, idle gaps, checkpoint and evaluation pauses, fast, slow and uneven
steps). Recall and delays are reported per fault type and per grade (type,
magnitude, scope), so graded faults (a straggler at -10/-15/-25 %) show apart.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from mlpe.agent.scenario import packaged
from mlpe.common.process import stop_children
from mlpe.common.settings import Settings, environment
from mlpe.notify.slack import parse_message
from mlpe.run.score import INSTANT_S, Received, incidents_of, score

DEFAULT_SCENARIOS = packaged("detect")
TAIL_S = 20.0        # the fleet runs this long after its last fault or gap


def register(sub) -> None:
    p = sub.add_parser("detect", help="fault scenarios → pipeline → webhook: precision, "
                       "recall, delay", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=str(DEFAULT_SCENARIOS), metavar="DIR",
                   help="directory of scenario YAML files, run together (default: "
                   "the detect scenarios shipped in mlpe.agent)")
    p.add_argument("--hz", type=float, default=100.0, help="GPU samples per second (100)")
    p.add_argument("--workers", type=int, default=1, help="stream worker processes (1)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds after a fault ends that its alerts still count (10)")
    p.add_argument("--details", default=None, metavar="FILE",
                   help="write every incident and every firing alert received, with what it "
                   "was matched to, as JSON lines")
    p.set_defaults(bench=bench_detect)


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


def duration_of(scenario_file: Path) -> float:
    from mlpe.agent.scenario import load

    s = load(str(scenario_file))
    ends = [f.at_s + (f.for_s or INSTANT_S) for f in s.faults]
    ends += [g.at_s + g.for_s for g in s.idle_gaps] + [s.warmup_s]
    return max(ends) + TAIL_S


def bench_detect(args, settings: Settings) -> dict:
    from mlpe.common.kafka import (
        forget_app,
        kafka_reachable,
        wait_group_stable,
        wait_stream_ready,
    )

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
    env = environment(MLPE_LOG_LEVEL="warning", MLPE_STREAM_START="latest",
                      MLPE_STREAM_APP_ID=f"bench-detect-{run_id}",
                      MLPE_NOTIFY_GROUP_ID=f"bench-detect-notify-{run_id}",
                      MLPE_NOTIFY_REDIS_PREFIX=f"mlpe:bench-detect:{run_id}",
                      MLPE_NOTIFY_START="latest",
                      MLPE_SLACK_WEBHOOK_URL=f"http://127.0.0.1:{port}/bench")
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
            wait_stream_ready(settings.kafka_bootstrap, env["MLPE_STREAM_APP_ID"],
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
            stop_children(procs, timeout=20)
            forget_app(settings.kafka_bootstrap, env["MLPE_STREAM_APP_ID"])
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
                                      "grade": i.grade, "node": i.node, "job": i.job,
                                      "onset": i.onset,
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
    print("  per grade (fault, magnitude, scope):", flush=True)
    for grade, row in result["per_grade"].items():
        print(f"    {grade:28s} recall {row['recall']:.2f} ({row['detected']}/"
              f"{row['incidents']})  delay p50 {row['delay_p50_s']} s / max "
              f"{row['delay_max_s']} s", flush=True)
    print(f"  overall: precision {result['precision']}, recall {result['recall']}, sudden-fault "
          f"delay p50 {result['delay_p50_s']} s / p99 {result['delay_p99_s']} s, false alarms "
          f"{result['false_alarms']} {result['false_alarm_rules']}", flush=True)
    return {"bench": "detect", "scenarios": len(files), "hz": args.hz, **result}


def _count(record: Path) -> int:
    return len(record.read_text().splitlines()) if record.exists() else 0
