"""The main job of `mlpe run`, step by step: start the services, plan a training job
through the optimizer, run a simulated fleet with faults, train a small real job and
SIGKILL one of its ranks midway, wait for the fleet's last data, then print the summary
(JSON on the last line) and write the report.

The stack (Kafka, InfluxDB, Redis) is already up: mlpe.run.run starts it around this.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlpe.agent import scenario
from mlpe.common.process import free_port, stop_children
from mlpe.common.settings import Settings, environment
from mlpe.run.progress import StatusLine

SCENARIO = scenario.packaged("run.yaml")
# The job: a Hugging Face Llama patched with mlpe.kernels and sharded with FSDP2, run as
# a user's script job (the example in the repository's examples/).
TRAIN_SCRIPT = Path(__file__).resolve().parents[3] / "examples" / "train_hf_llama.py"
SERVICE_LOGS = ("stream", "notify", "optimizer", "agent", "gpu-agent")  # tails shown on failure


class MainJob:
    """One `mlpe run`: its services, its fleet, its training job, in `work`."""

    def __init__(self, args, settings: Settings, run_id: str, work: Path):
        self.args, self.settings, self.run_id, self.work = args, settings, run_id, work
        self.procs: dict[str, subprocess.Popen] = {}
        self.sink_port = free_port()
        self.optimizer_port = free_port()
        self.slack = settings.slack_webhook_url
        # Names of this run's own: its consumer groups, Redis keys and jobs never meet
        # those of another run or of the services a person runs.
        self.env = environment(
            MLPE_LOG_LEVEL="warning", MLPE_STREAM_START="latest",
            MLPE_STREAM_APP_ID=f"run-{run_id}", MLPE_NOTIFY_GROUP_ID=f"run-notify-{run_id}",
            MLPE_NOTIFY_REDIS_PREFIX=f"mlpe:run:{run_id}", MLPE_NOTIFY_START="latest",
            MLPE_CONTROL_NAMESPACE=f"run-{run_id}",
            MLPE_SLACK_WEBHOOK_URL=self.slack or f"http://127.0.0.1:{self.sink_port}/run")
        self.record = work / "webhook.jsonl"
        self.fleet = f"run{run_id}"
        self.status = StatusLine()
        self.fleet_started = 0.0
        self.killed_wall = 0.0

    def execute(self) -> int:
        """Every step, in order; 0 when done (a failure raises, after the services' log
        tails on stderr). The services are stopped either way."""
        from mlpe.agent.sources.nvml import nvml_available
        from mlpe.common.kafka import forget_app, wait_group_stable, wait_stream_ready
        from mlpe.control.local import LocalController
        from mlpe.run.summary import print_summary

        s, say = self.settings, self.status.say
        control = LocalController(s.redis_url, s.kafka_bootstrap, self.work, slots=2,
                                  namespace=f"run-{self.run_id}", extra_env={
                                      "MLPE_CONTROL_SCRIPT_ROOTS": str(TRAIN_SCRIPT.parent)})
        try:
            print("mlpe run: starting stream, notify, control and optimizer …", flush=True)
            if not self.slack:
                self.start_service("webhook-sink", "webhook-sink", "--port",
                                   str(self.sink_port), "--record", str(self.record))
            # The optimizer asks this run's controller (GetJob) about the job it advises.
            self.env["MLPE_CONTROL_ADDRESS"] = f"127.0.0.1:{control.port}"
            notify = self.start_service("notify", "notify")
            stream = self.start_service("stream", "stream")
            self.start_service("optimizer", "optimizer", "--listen",
                               f"127.0.0.1:{self.optimizer_port}")
            control.start()
            wait_stream_ready(s.kafka_bootstrap, self.env["MLPE_STREAM_APP_ID"], 1, [stream])
            wait_group_stable(s.kafka_bootstrap, self.env["MLPE_NOTIFY_GROUP_ID"], 1, [notify])
            plan = self.plan_training()
            say(f"mlpe run: fleet of 2 x 8 simulated GPUs for {self.args.duration:.0f} s "
                f"(faults: {SCENARIO.name}); alerts to "
                f"{'your Slack webhook' if self.slack else 'the built-in webhook sink'}",
                flush=True)
            self.start_service("agent", "agent", "--source", "sim", "--scenario",
                               str(SCENARIO), "--node-id", self.fleet, "--duration",
                               f"{self.args.duration:g}", "--spool-dir",
                               str(self.work / "spool"), "--stats-json",
                               str(self.work / "agent.json"))
            self.fleet_started = time.monotonic()
            if nvml_available():  # this machine's own GPUs, watched alongside the fleet
                say("mlpe run: NVIDIA GPUs found: their agent runs too (NVML + host)",
                    flush=True)
                self.start_service("gpu-agent", "agent", "--source", "nvml,host",
                                   "--duration", f"{self.args.duration:g}", "--spool-dir",
                                   str(self.work / "gpu-spool"))
            job_id, recovery = self.train_and_kill(control)
            self.wait_fleet()
            self.wait_last_windows()
            summary = self.collect_summary(control, job_id, recovery, plan)
            self.status.clear()
            print_summary(summary)
            report = self.args.report or self.work / "report.html"
            summary["report_series"] = self.write_report(report, summary)
            summary["report"] = str(report)
            print(json.dumps(summary), flush=True)
            return 0
        except BaseException:
            for name in SERVICE_LOGS:
                log = self.work / f"{name}.log"
                if log.exists() and log.stat().st_size:
                    print(f"--- {name} log (tail) ---\n{log.read_text()[-1500:]}",
                          file=sys.stderr)
            raise
        finally:
            control.stop()
            stop_children(self.procs.values(), timeout=20)
            forget_app(s.kafka_bootstrap, self.env["MLPE_STREAM_APP_ID"])

    def start_service(self, name: str, *argv: str) -> subprocess.Popen:
        """`mlpe <argv>` as a child, its output in <work>/<name>.log."""
        proc = subprocess.Popen([sys.executable, "-m", "mlpe.cli", *argv], env=self.env,
                                stdout=(self.work / f"{name}.log").open("wb"),
                                stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    # -- the steps ---------------------------------------------------------------------
    def plan_training(self) -> dict:
        """The optimizer's best layout for llama3-8b on 2 x 8 H100 (asked over gRPC)."""
        import grpc

        from mlpe.v1 import optimizer_pb2 as o

        request = o.PlanRequest(model=o.ModelShape(preset="llama3-8b"),
                                cluster=o.ClusterSpec(preset="2x8xH100"),
                                training=o.TrainingSpec(global_batch=256, seq_len=8192),
                                top_k=3)
        stub = self.optimizer
        deadline = time.monotonic() + 60
        while True:  # the optimizer may still be starting
            try:
                answer = stub.PlanTraining(request, timeout=30)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        best = answer.plans[0]
        self.status.say(f"mlpe run: plan for llama3-8b on 2x8 H100 ({answer.evaluated:,} "
                        f"layouts in {answer.search_ms:.0f} ms): {best.summary}", flush=True)
        return {"model": "llama3-8b", "cluster": "2x8xH100", "best": best.summary}

    def train_and_kill(self, control) -> tuple[str, dict]:
        """Submit the script job (a small Hugging Face Llama on mlpe.kernels, FSDP2 over 2
        CPU ranks), SIGKILL rank 1 a third of the way, watch rank 0 resume from a sharded
        checkpoint; (job id, recovery figures) once the job has ended."""
        from mlpe.v1 import control_pb2 as c

        say = self.status.say
        if not TRAIN_SCRIPT.is_file():
            raise RuntimeError(f"mlpe run: the training script {TRAIN_SCRIPT} is missing "
                               "(run from a checkout of the repository)")
        job = control.submit(c.JobSpec(
            name="mlpe-run", steps=self.args.steps, world_size=2, max_restarts=2,
            device="cpu", kernel_report_steps=50,
            checkpoint=c.CheckpointPolicy(every_steps=25, keep=3),
            entrypoint=c.Entrypoint(script=str(TRAIN_SCRIPT), args=[
                "--steps", str(self.args.steps), "--ckpt-every", "25"])))
        say(f"mlpe run: training job {job.job_id} submitted (Hugging Face Llama on "
            f"mlpe.kernels, FSDP2 over 2 CPU ranks, {self.args.steps} steps, sharded "
            "checkpoint every 25)", flush=True)
        kill_at = self.args.steps // 3
        victim, killed_at, recovery = None, 0.0, {}
        last_shown = 0.0
        while True:
            state = control.job(job.job_id)
            progress = control.progress(job.job_id)
            now = time.monotonic()
            if victim is None and progress.get(1, {}).get("step", 0) >= kill_at:
                victim = progress[1]
                os.kill(victim["pid"], signal.SIGKILL)
                killed_at, self.killed_wall = now, time.time()
                say(f"mlpe run: killed rank 1 (pid {victim['pid']}) at step "
                    f"{victim['step']} — the controller should bring it back", flush=True)
            if victim and not recovery:
                p = progress.get(0, {})
                # Rank 0 of the restarted pair, stepping past the checkpoint it resumed from.
                if p.get("pid") and p["pid"] != victim["pid"] and \
                        p.get("step", 0) > p.get("resumed_from", 0) > 0:
                    recovery = {"kill_to_first_step_s": round(now - killed_at, 1),
                                "resumed_from": p["resumed_from"],
                                "killed_at_step": victim["step"]}
                    say(f"mlpe run: recovered in {recovery['kill_to_first_step_s']} s from "
                        f"the checkpoint of step {p['resumed_from']}", flush=True)
            if now - last_shown >= (0.5 if self.status.tty else 3):
                last_shown = now
                self.show_progress(f"job {state.step:>4}/{self.args.steps} loss "
                                   f"{state.loss:6.3f} restarts {state.restarts}")
            if state.state in (c.JOB_STATE_COMPLETED, c.JOB_STATE_FAILED,
                               c.JOB_STATE_CANCELLED):
                return job.job_id, recovery
            time.sleep(0.2)

    def wait_fleet(self) -> None:
        """Until the simulated fleet's agent has run its --duration and exited."""
        agent = self.procs["agent"]
        while agent.poll() is None:
            self.show_progress("job done; waiting for the fleet")
            time.sleep(0.5 if self.status.tty else 5)
        self.status.say("mlpe run: the fleet stopped; reading back what it sent")

    def wait_last_windows(self, timeout: float = 30.0) -> None:
        """Until the fleet's last second of GPU windows is in InfluxDB (the stream writes a
        window once its lateness allowance has passed), or `timeout`."""
        from influxdb_client import InfluxDBClient

        from mlpe.common.tokens import influx_token

        stopped = json.loads((self.work / "agent.json").read_text())["stopped_at"]
        s = self.settings
        flux = f'''import "strings"
            from(bucket: "{s.influx_bucket_of('1s')}") |> range(start: -10m)
              |> filter(fn: (r) => r._measurement == "gpu" and r.window == "1s" and
                  r._field == "samples" and strings.hasPrefix(v: r.node, prefix: "{self.fleet}"))
              |> group() |> max(column: "_time")'''
        deadline = time.monotonic() + timeout
        with InfluxDBClient(url=s.influx_url, token=influx_token(s), org=s.influx_org) as db:
            while time.monotonic() < deadline:
                newest = [r.get_time().timestamp() for t in db.query_api().query(flux)
                          for r in t.records]
                if newest and newest[0] >= stopped - 2:
                    return
                time.sleep(0.5)
        print("mlpe run: the last windows are not in InfluxDB after "
              f"{timeout:.0f} s; the summary may miss the final seconds", file=sys.stderr)

    def collect_summary(self, control, job_id: str, recovery: dict, plan: dict) -> dict:
        """Gather what the run left (the webhook record, the agent's stats, the job, the
        optimizer's advice) into the summary dict."""
        from mlpe.control.store import state_name
        from mlpe.run.summary import build_summary, read_webhook_records

        job = control.job(job_id)
        return build_summary(
            run_id=self.run_id, scenario=SCENARIO, fleet=self.fleet,
            duration_s=self.args.duration, records=read_webhook_records(self.record),
            agent_stats=json.loads((self.work / "agent.json").read_text()),
            job={"id": job_id, "state": state_name(job.state), "steps": job.step,
                 "loss": round(job.loss, 4), "restarts": job.restarts},
            recovery=recovery, plan=plan,
            advice={who: self.advice_for(who) for who in (job_id, f"{self.fleet}-job")},
            killed_wall=self.killed_wall)

    def advice_for(self, job_id: str) -> list[str]:
        """The optimizer's recommendations for a job, one line each."""
        import grpc

        from mlpe.v1 import optimizer_pb2 as o

        try:
            answer = self.optimizer.AdviseJob(
                o.AdviseJobRequest(job_id=job_id, window_s=600), timeout=60)
        except grpc.RpcError as err:
            return [f"(advice unavailable: {err.details()})"]
        return [f"[{r.severity}] {r.title} — {r.evidence}" for r in answer.recommendations]

    def write_report(self, path: Path, summary: dict) -> dict[str, int]:
        """The HTML report, its plots read back from InfluxDB; how many series each drew."""
        from mlpe.run.report import read_series, write_html_report

        data = read_series(self.settings, self.fleet, summary["job"]["id"], self.killed_wall)
        drawn = write_html_report(path, summary, data)
        print(f"report: {path}")
        return drawn

    # -- helpers -----------------------------------------------------------------------
    @functools.cached_property
    def optimizer(self):
        """A gRPC stub of this run's optimizer (one channel for the whole run)."""
        import grpc

        from mlpe.v1 import optimizer_pb2_grpc

        return optimizer_pb2_grpc.OptimizerStub(
            grpc.insecure_channel(f"127.0.0.1:{self.optimizer_port}"))

    def show_progress(self, text: str) -> None:
        """The status line: the job's or the wait's `text`, the fleet's time, the
        webhook messages so far."""
        fleet = min(time.monotonic() - self.fleet_started, self.args.duration) \
            if self.fleet_started else 0.0
        self.status.show(f"  {text} | fleet {fleet:3.0f}/{self.args.duration:.0f} s | "
                         f"webhook messages {self.deliveries()}")

    def deliveries(self) -> int:
        return len(self.record.read_text().splitlines()) if self.record.exists() else 0
