"""`mlpe run` (what `make run` calls): the whole promise in a few minutes.

Starts the stack and every service (stream, notify with a webhook sink or your Slack
webhook, control, optimizer), a simulated fleet of two 8-GPU nodes with a few faults (real
NVML instead on a machine with GPUs), plans a training job, submits a small real one
(CPU here), kills one of its workers midway and watches it recover. Shows a line of
progress every few seconds, prints a summary and writes an HTML report with plots read
back from InfluxDB. Leaves the stack as it found it unless --keep.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from mlpe.agent import scenario
from mlpe.common.settings import Settings, environment

SCENARIO = scenario.packaged("run.yaml")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: a watched fleet with faults, alerts, a "
                       "planned, trained, crashed and recovered job, a report",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=bounded(float, 20, 3600), default=90.0,
                   help="seconds the simulated fleet runs, 20 to 3600 (90; its faults begin "
                        "at 25, 40 and 55 s)")
    p.add_argument("--steps", type=bounded(int, 100, 100_000), default=600,
                   help="training steps of the job, at least 100 so that the kill a third of "
                        "the way lands after the first checkpoint (600)")
    p.add_argument("--report", type=Path, default=None,
                   help="HTML report (default: <state dir>/run/<id>/report.html)")
    p.add_argument("--keep", action="store_true",
                   help="leave the stack running afterwards (default: as it was found)")
    p.set_defaults(func=run)


def bounded(kind, low, high):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low}..{high}")
        return value
    return parse


def run(args, settings: Settings) -> int:
    from mlpe import stack
    from mlpe.common.kafka import kafka_reachable

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # refused connects: we report
    before = {s.name: s.state for s in stack.status(settings)}
    print("mlpe run: starting Kafka, InfluxDB and Redis …", flush=True)
    stack.up(settings)
    if not kafka_reachable(settings.kafka_bootstrap):
        print(f"mlpe run: Kafka not reachable at {settings.kafka_bootstrap}", file=sys.stderr)
        return 1
    run_id = uuid.uuid4().hex[:6]
    work = settings.state_dir / "run" / run_id
    work.mkdir(parents=True, exist_ok=True)
    try:
        return Demo(args, settings, run_id, work).go()
    finally:
        started_here = tuple(n for n, state in before.items() if state != "up")
        if started_here and not args.keep:
            stack.down(settings, started_here)
            print(f"mlpe run: stopped {', '.join(started_here)} (it was not running before; "
                  "--keep leaves it up)")


class Demo:
    def __init__(self, args, settings: Settings, run_id: str, work: Path):
        self.args, self.settings, self.run_id, self.work = args, settings, run_id, work
        self.procs: dict[str, subprocess.Popen] = {}
        from mlpe.common.process import free_port

        self.sink_port = free_port()
        self.optimizer_port = free_port()
        self.slack = settings.slack_webhook_url
        self.env = environment(
            MLPE_LOG_LEVEL="warning", MLPE_STREAM_START="latest",
            MLPE_STREAM_APP_ID=f"run-{run_id}", MLPE_NOTIFY_GROUP_ID=f"run-notify-{run_id}",
            MLPE_NOTIFY_REDIS_PREFIX=f"mlpe:run:{run_id}", MLPE_NOTIFY_START="latest",
            MLPE_CONTROL_NAMESPACE=f"run-{run_id}",
            MLPE_SLACK_WEBHOOK_URL=self.slack or f"http://127.0.0.1:{self.sink_port}/run")
        self.record = work / "webhook.jsonl"
        self.fleet = f"run{run_id}"
        self.tty = sys.stdout.isatty()
        self.status_shown = False
        self.fleet_started = 0.0
        self.killed_wall = 0.0

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "mlpe.cli", *argv], env=self.env,
                                stdout=(self.work / f"{name}.log").open("wb"),
                                stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def go(self) -> int:
        from mlpe.agent.sources.nvml import nvml_available
        from mlpe.common.kafka import wait_group_stable
        from mlpe.control.local import LocalController

        s = self.settings
        control = LocalController(s.redis_url, s.kafka_bootstrap, self.work, slots=2,
                                  namespace=f"run-{self.run_id}")
        try:
            print("mlpe run: starting stream, notify, control and optimizer …", flush=True)
            if not self.slack:
                self.start("webhook-sink", "webhook-sink", "--port", str(self.sink_port),
                           "--record", str(self.record))
            notify = self.start("notify", "notify")
            stream = self.start("stream", "stream")
            self.start("optimizer", "optimizer", "--listen", f"127.0.0.1:{self.optimizer_port}")
            control.start()
            wait_group_stable(s.kafka_bootstrap, self.env["MLPE_STREAM_APP_ID"], 1, [stream])
            wait_group_stable(s.kafka_bootstrap, self.env["MLPE_NOTIFY_GROUP_ID"], 1, [notify])
            plan = self.plan()
            self.say(f"mlpe run: fleet of 2 x 8 simulated GPUs for {self.args.duration:.0f} s "
                  f"(faults: {SCENARIO.name}); alerts to "
                  f"{'your Slack webhook' if self.slack else 'the built-in webhook sink'}",
                  flush=True)
            self.start("agent", "agent", "--source", "sim", "--scenario", str(SCENARIO),
                       "--node-id", self.fleet, "--duration", f"{self.args.duration:g}",
                       "--spool-dir", str(self.work / "spool"),
                       "--stats-json", str(self.work / "agent.json"))
            self.fleet_started = time.monotonic()
            if nvml_available():  # this machine's own GPUs, watched alongside the fleet
                self.say("mlpe run: NVIDIA GPUs found: their agent runs too (NVML + host)",
                      flush=True)
                self.start("gpu-agent", "agent", "--source", "nvml,host", "--duration",
                           f"{self.args.duration:g}", "--spool-dir",
                           str(self.work / "gpu-spool"))
            job, recovery = self.train(control)
            self.wait_agent()
            self.wait_last_windows()
            summary = self.summarise(control, job, recovery, plan)
            report = self.args.report or self.work / "report.html"
            summary["report_series"] = self.report(report, job, summary)
            summary["report"] = str(report)
            print(json.dumps(summary), flush=True)
            return 0
        except BaseException:
            for name in ("stream", "notify", "optimizer", "agent", "gpu-agent"):
                log = self.work / f"{name}.log"
                if log.exists() and log.stat().st_size:
                    print(f"--- {name} log (tail) ---\n{log.read_text()[-1500:]}",
                          file=sys.stderr)
            raise
        finally:
            control.stop()
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()

    # -- the steps --------------------------------------------------------------------
    def plan(self) -> dict:
        import grpc

        from mlpe.v1 import optimizer_pb2 as o
        from mlpe.v1 import optimizer_pb2_grpc

        stub = optimizer_pb2_grpc.OptimizerStub(
            grpc.insecure_channel(f"127.0.0.1:{self.optimizer_port}"))
        request = o.PlanRequest(model=o.ModelShape(preset="llama3-8b"),
                                cluster=o.ClusterSpec(preset="2x8xH100"),
                                training=o.TrainingSpec(global_batch=256, seq_len=8192),
                                top_k=3)
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = stub.PlanTraining(request, timeout=30)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        best = answer.plans[0]
        self.say(f"mlpe run: plan for llama3-8b on 2x8 H100 ({answer.evaluated:,} layouts in "
              f"{answer.search_ms:.0f} ms): {best.summary}", flush=True)
        return {"model": "llama3-8b", "cluster": "2x8xH100", "best": best.summary}

    def train(self, control) -> tuple[str, dict]:
        from mlpe.v1 import control_pb2 as c

        job = control.submit(c.JobSpec(
            name="mlpe-run", model=c.ModelSpec(preset="tiny"), steps=self.args.steps,
            world_size=2, micro_batch=2, global_batch=8, max_restarts=2, device="cpu",
            kernel_report_steps=50, checkpoint=c.CheckpointPolicy(every_steps=25, keep=3)))
        self.say(f"mlpe run: training job {job.job_id} submitted (tiny GPT, 2 ranks, "
              f"{self.args.steps} steps, checkpoint every 25)", flush=True)
        kill_at = self.args.steps // 3
        victim, killed_at, recovery = None, 0.0, {}
        last_print = 0.0
        while True:
            state = control.job(job.job_id)
            progress = control.progress(job.job_id)
            now = time.monotonic()
            if victim is None and progress.get(1, {}).get("step", 0) >= kill_at:
                victim = progress[1]
                os.kill(victim["pid"], signal.SIGKILL)
                killed_at, self.killed_wall = now, time.time()
                self.say(f"mlpe run: killed rank 1 (pid {victim['pid']}) at step "
                      f"{victim['step']} — the controller should bring it back", flush=True)
            if victim and not recovery:
                p = progress.get(0, {})
                if p.get("pid") and p["pid"] != victim["pid"] and \
                        p.get("step", 0) > p.get("resumed_from", 0) > 0:
                    recovery = {"kill_to_first_step_s": round(now - killed_at, 1),
                                "resumed_from": p["resumed_from"],
                                "killed_at_step": victim["step"]}
                    self.say(f"mlpe run: recovered in {recovery['kill_to_first_step_s']} s from "
                          f"the checkpoint of step {p['resumed_from']}", flush=True)
            if now - last_print >= (0.5 if self.tty else 3):
                last_print = now
                self.progress(f"job {state.step:>4}/{self.args.steps} loss {state.loss:6.3f} "
                              f"restarts {state.restarts}")
            if state.state in (c.JOB_STATE_COMPLETED, c.JOB_STATE_FAILED,
                               c.JOB_STATE_CANCELLED):
                return job.job_id, recovery
            time.sleep(0.2)

    def wait_agent(self) -> None:
        agent = self.procs["agent"]
        while agent.poll() is None:
            self.progress("job done; waiting for the fleet")
            time.sleep(0.5 if self.tty else 5)
        self.say("mlpe run: the fleet stopped; reading back what it sent")

    def wait_last_windows(self, timeout: float = 30.0) -> None:
        """Until the fleet's last second of GPU windows is in InfluxDB (the stream writes a
        window once its lateness allowance has passed), or `timeout`."""
        from influxdb_client import InfluxDBClient

        from mlpe.common.tokens import influx_token

        stopped = json.loads((self.work / "agent.json").read_text())["stopped_at"]
        s = self.settings
        flux = f'''import "strings"
            from(bucket: "{s.influx_bucket}") |> range(start: -10m)
              |> filter(fn: (r) => r._measurement == "gpu" and r.window == "1s" and
                  r._field == "samples" and strings.hasPrefix(v: r.node, prefix: "{self.fleet}"))
              |> group() |> max(column: "_time")'''
        deadline = time.monotonic() + timeout
        with InfluxDBClient(url=s.influx_url, token=influx_token(s),
                            org=s.influx_org) as db:
            while time.monotonic() < deadline:
                newest = [r.get_time().timestamp() for t in db.query_api().query(flux)
                          for r in t.records]
                if newest and newest[0] >= stopped - 2:
                    return
                time.sleep(0.5)
        print("mlpe run: the last windows are not in InfluxDB after "
              f"{timeout:.0f} s; the summary may miss the final seconds", file=sys.stderr)

    def progress(self, text: str) -> None:
        """One compact status line: rewritten in place on a terminal, a line every few
        seconds otherwise (logs, CI)."""
        fleet = min(time.monotonic() - self.fleet_started, self.args.duration) \
            if self.fleet_started else 0.0
        line = (f"  {text} | fleet {fleet:3.0f}/{self.args.duration:.0f} s | webhook "
                f"messages {self.deliveries()}")
        if self.tty:
            sys.stdout.write("\r\x1b[2K" + line[:shutil.get_terminal_size().columns - 1])
            sys.stdout.flush()
            self.status_shown = True
        else:
            print(line, flush=True)

    def say(self, *args, **kwargs) -> None:
        """print(), after ending an in-place status line."""
        if self.status_shown:
            sys.stdout.write("\r\x1b[2K")
            self.status_shown = False
        print(*args, **kwargs)

    def deliveries(self) -> int:
        return len(self.record.read_text().splitlines()) if self.record.exists() else 0

    def summarise(self, control, job_id: str, recovery: dict, plan: dict) -> dict:
        import grpc

        from mlpe.notify.slack import parse_message
        from mlpe.run.score import Received, incidents_of, score
        from mlpe.v1 import optimizer_pb2 as o
        from mlpe.v1 import optimizer_pb2_grpc

        stats = json.loads((self.work / "agent.json").read_text())
        received, on_job = [], []
        for line in (self.record.read_text().splitlines() if self.record.exists() else []):
            entry = json.loads(line)
            for title, detector, labels, firing in parse_message(entry["body"]):
                if firing and (labels.get("node", "").startswith(self.fleet) or
                               labels.get("job", "").startswith(self.fleet)):
                    received.append(Received(entry["received_at"], SCENARIO.stem, title,
                                             detector, labels))
                elif labels.get("job") == job_id:  # the real job: not scored, but shown
                    on_job.append({"alert": title, "firing": firing, "s_after_kill": round(
                        entry["received_at"] - self.killed_wall, 1) if self.killed_wall
                        else None})
        started = stats["started_ns"] / 1e9
        # Faults scheduled after the fleet stopped (a short --duration) never happened.
        incidents = [i for i in incidents_of(SCENARIO, self.fleet, started, 10.0)
                     if i.onset < started + self.args.duration]
        scored = score(incidents, received)
        stub = optimizer_pb2_grpc.OptimizerStub(
            grpc.insecure_channel(f"127.0.0.1:{self.optimizer_port}"))
        advice = {}
        for who in (job_id, f"{self.fleet}-job"):
            try:
                answer = stub.AdviseJob(o.AdviseJobRequest(job_id=who, window_s=600),
                                        timeout=60)
                advice[who] = [f"[{r.severity}] {r.title} — {r.evidence}"
                               for r in answer.recommendations]
            except grpc.RpcError as err:
                advice[who] = [f"(advice unavailable: {err.details()})"]
        job = control.job(job_id)
        values = stats.get("values_sent") or stats.get("values") or stats.get("sent")
        summary = {"run": self.run_id, "values_ingested": values,
                   "alerts": [{"rule": r.rule, "delay_s": None if r.incident is None else
                               round(r.at - r.incident.onset, 1)} for r in received],
                   "fault_recall": scored["recall"], "false_alarms": scored["false_alarms"],
                   "job_alerts": on_job, "webhook_deliveries": self.deliveries(),
                   "plan": plan,
                   "job": {"id": job_id, "state": c_state(job.state), "steps": job.step,
                           "loss": round(job.loss, 4), "restarts": job.restarts,
                           **recovery},
                   "advice": advice}
        self.say("\n== mlpe run: summary ==")
        print(f"values ingested: {values}")
        print(f"alerts: {len(received)} (faults caught {scored['recall']:.0%}, false alarms "
              f"{scored['false_alarms']}), webhook messages {self.deliveries()}")
        for a in summary["alerts"]:
            print(f"  - {a['rule']}" + (f" after {a['delay_s']} s" if a["delay_s"] else ""))
        print(f"alerts on the training job {job_id} (not scored): {len(on_job)}")
        for a in on_job:
            when = "" if a["s_after_kill"] is None else \
                f" ({abs(a['s_after_kill'])} s {'after' if a['s_after_kill'] >= 0 else 'before'}"\
                " the kill)"
            print(f"  - {'' if a['firing'] else 'resolved: '}{a['alert']}{when}")
        print(f"plan: {plan['model']} on {plan['cluster']}: {plan['best']}")
        print(f"job {job_id}: {summary['job']['state']} at step {job.step}, loss "
              f"{job.loss:.3f}, restarts {job.restarts}"
              + (f", recovered in {recovery['kill_to_first_step_s']} s" if recovery else ""))
        for who, lines in advice.items():
            print(f"advice for {who}:")
            for line in lines[:4]:
                print(f"  {line}")
        return summary

    def report(self, path: Path, job_id: str, summary: dict) -> dict:
        """Write the HTML report; return how many series each plot drew."""
        figures, drawn = plots(self.settings, self.fleet, job_id, self.killed_wall)
        body = "".join(f"<h2>{title}</h2><img src='data:image/png;base64,{png}'>"
                       for title, png in figures)
        pre = json.dumps(summary, indent=1).replace("<", "&lt;")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>mlpe run "
                        f"{self.run_id}</title></head><body style='font-family:sans-serif'>"
                        f"<h1>mlpe run {self.run_id}</h1>{body}<h2>Summary</h2><pre>{pre}"
                        f"</pre></body></html>")
        print(f"report: {path}")
        return drawn


def c_state(state: int) -> str:
    from mlpe.control.store import state_name

    return state_name(state)


def plots(settings: Settings, fleet: str, job_id: str,
          killed_wall: float = 0.0) -> tuple[list[tuple[str, str]], dict]:
    """(title, base64 PNG) of the fleet's GPUs with alert markers, and the job's training,
    read back from InfluxDB; and how many series (or alert markers) each drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from influxdb_client import InfluxDBClient

    from mlpe.common.tokens import influx_token

    token = influx_token(settings)
    head = f'from(bucket: "{settings.influx_bucket}") |> range(start: -30m)'
    out, drawn = [], {}
    with InfluxDBClient(url=settings.influx_url, token=token, org=settings.influx_org) as db:
        q = db.query_api()

        def series(flux: str) -> dict:
            data: dict = {}
            for table in q.query(flux):
                for r in table.records:
                    key = tuple(str(r.values.get(k)) for k in ("node", "gpu", "rank",
                                                               "_field"))
                    data.setdefault(key, ([], []))
                    data[key][0].append(r.get_time())
                    data[key][1].append(r.get_value())
            return data
        alerts = [r for t in q.query(f'''{head} |> filter(fn: (r) => r._measurement == "alert"
                  and r._field == "state" and r._value == "firing")''') for r in t.records
                  if str(r.values.get("node", "")).startswith(fleet)]
        fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
        for ax, field, unit in zip(axes, ("util_mean", "power_mean", "temp_mean"),
                                   ("GPU util %", "power W", "temperature °C"), strict=True):
            data = series(f'''{head} |> filter(fn: (r) => r._measurement == "gpu" and
                r.window == "1s" and r._field == "{field}")
                |> filter(fn: (r) => strings.hasPrefix(v: r.node, prefix: "{fleet}"))'''
                          .replace("from(", 'import "strings"\nfrom(', 1))
            drawn[field] = len(data)
            for (node, gpu, _, _), (ts, vs) in sorted(data.items()):
                ax.plot(ts, vs, lw=0.7, label=f"{node[-2:]}/{gpu}")
            for a in alerts:
                ax.axvline(a.get_time(), color="red", lw=0.8, alpha=0.6)
            ax.set_ylabel(unit)
        axes[0].set_title("simulated fleet (red lines: alerts)")
        out.append(("GPUs", _png(fig, plt)))
        steps = series(f'''{head} |> filter(fn: (r) => r._measurement == "train" and
            r.window == "1s" and r.job == "{job_id}" and (r._field == "loss_mean" or
            r._field == "tokens_per_s_mean" or r._field == "step_time_s_mean"))''')
        drawn["alert_markers"] = len(alerts)
        for field in ("loss_mean", "tokens_per_s_mean", "step_time_s_mean"):
            drawn[field] = sum(1 for key in steps if key[3] == field)
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for (_, _, rank, field), (ts, vs) in sorted(steps.items()):
            if field == "step_time_s_mean":
                axes[2].hist(vs, bins=30, alpha=0.6, label=f"rank {rank}")
            else:  # a gap (the kill, the restart) is left blank, not bridged
                gapped_t, gapped_v = [], []
                for i, (t, v) in enumerate(zip(ts, vs, strict=True)):
                    if i and (t - ts[i - 1]).total_seconds() > 2.5:
                        gapped_t.append(t)
                        gapped_v.append(float("nan"))
                    gapped_t.append(t)
                    gapped_v.append(v)
                axes[0 if field == "loss_mean" else 1].plot(gapped_t, gapped_v, ".-", lw=0.8,
                                                            ms=3, label=f"rank {rank}")
        if killed_wall:
            killed = datetime.fromtimestamp(killed_wall, UTC)
            for ax in axes[:2]:
                ax.axvline(killed, color="red", lw=0.8, label="rank 1 killed")
        for ax, title in zip(axes, ("loss", "tokens/s per rank", "step time (s) distribution"),
                             strict=True):
            ax.set_title(title)
            ax.legend(fontsize=7)
        fig.autofmt_xdate()
        out.append((f"training job {job_id}", _png(fig, plt)))
    return out, drawn


def _png(fig, plt) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()
