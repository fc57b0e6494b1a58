"""Launches jobs, watches them, restarts them from their last checkpoint.

A job's ranks are started by `mlpe.worker.launch` (torchrun's environment, forked from a
standby that has already imported torch, so a restart costs a fork instead of an
interpreter start and torch import per rank). Every job, built-in or script, is an
entry point: the built-in model is the module `mlpe.worker.main`.

Every tick (0.25 s): each launched job's workers are checked — the launcher and every
rank's pid alive, every rank's last step recent enough (hang watch, for ranks that
report through mlpe.sdk) — and its progress copied into the job record and the event
log; then queued jobs start in priority order while slots (one per rank) are free. A
crashed or hung job has its ranks killed and is launched again (all ranks, from the
newest good checkpoint) until max_restarts is spent; each restart is an event and an
alert. A failure's message ends with the last lines of the failed rank's output.

Launch facts (pid and its /proc start time) are kept in Redis, so a restarted
controller re-attaches to workers that are still running, or restarts them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlpe.common.logs import looks_secret, redact
from mlpe.common.process import pid_alive, signal_group, start_ticks
from mlpe.control import costs
from mlpe.control.store import (
    CANCELLED,
    COMPLETED,
    ENDED,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    JobStore,
    TransitionError,
    cost_of,
)

log = logging.getLogger("mlpe.control")
TICK_S = 0.25
STARTUP_GRACE_S = 60.0    # before a rank's first step: imports, rendezvous, checkpoint load
CANCEL_GRACE_S = 10.0     # a cancelled job's workers get this long to stop by themselves
STEP_EVENT_EVERY_S = 0.5  # step events in the log at most this often per job
STANDBY_DELAY_S = 10.0    # after a launch, before the next standby starts importing torch
                          # (it would slow the ranks just launched on a small machine),
                          # unless the job is stepping already
LAUNCHER_GRACE_S = 1.0    # a dead rank's launcher exits within this, saying which failed
OUTPUT_TAIL_LINES = 15    # of a failed rank's output, in the job's message
BUILTIN = {"script": "", "module": "mlpe.worker.main", "args": [], "env": {}}
COST_EVERY_S = 10.0       # a holding job's cost goes to mlpe.events.cost this often
BUDGET_WARN = 0.8         # of a job's budget: a warning alert


def output_tail(path: Path, secrets: list[str], lines: int = OUTPUT_TAIL_LINES) -> str:
    """The last lines of a rank's output, secrets masked, at most 2,000 characters."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16_384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.rstrip().splitlines()[-lines:])
    return redact(tail, secrets)[-2000:]


class Supervisor:
    def __init__(self, store: JobStore, jobs_root: Path, slots: int, *, alerts=None,
                 placements=None, python: str = sys.executable, env: dict | None = None,
                 standbys: int = 1, pricer: costs.Pricer | None = None, publish_cost=None,
                 budget_alerts=None, label_budgets=(), label_alerts=None):
        self.store, self.jobs_root, self.slots = store, Path(jobs_root), slots
        self.alerts = alerts              # async callable(job record, reason) or None
        self.placements = placements      # async callable(job id, ranks, ended) or None
        self.pricer = pricer              # opens each job's cost ledger; None = no costs
        self.publish_cost = publish_cost  # async callable(JobCost) or None
        self.budget_alerts = budget_alerts  # async callable(record, JobCost, level, action)
        self.label_budgets = tuple(label_budgets)  # LabelBudgets (MLPE_BUDGETS)
        self.label_alerts = label_alerts  # async callable(budget, total, currency, level, jobs)
        self.label_budgets_due = 0.0
        self.cost_sent: dict[str, tuple[float, str]] = {}  # job id -> when and in which
        # phase its cost was last published
        self.python, self.env = python, env
        self.children: dict[str, subprocess.Popen] = {}
        self.active: dict[str, int] = {}  # job id -> ranks it holds
        self.last_step_event: dict[str, float] = {}
        self.cancelled_at: dict[str, float] = {}
        self.placed: dict[str, int] = {}  # job id -> attempt whose placement is published
        self.noted_no_sdk: set[str] = set()
        self.dead_seen: dict[str, float] = {}  # job id -> when a dead rank was first seen
        self.standby_count, self.standbys = standbys, []
        self.standby_due = 0.0

    def free_slots(self) -> int:
        return self.slots - sum(self.active.values())

    # -- launching --------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_root / job_id

    def attempt_dir(self, job_id: str, attempt: int) -> Path:
        return self.job_dir(job_id) / "logs" / f"attempt-{attempt}"

    def _start_standby(self) -> subprocess.Popen:
        self.jobs_root.mkdir(parents=True, exist_ok=True)
        with open(self.jobs_root / "standby.log", "ab") as out:
            return subprocess.Popen([self.python, "-m", "mlpe.worker.launch"],
                                    stdin=subprocess.PIPE, stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)  # its own group: killable

    def keep_standby(self) -> None:
        """Keep `standby_count` launchers importing torch ahead of need, but never right
        after a launch (they would compete with the ranks starting up)."""
        self.standbys = [p for p in self.standbys if p.poll() is None]
        if len(self.standbys) < self.standby_count and time.monotonic() >= self.standby_due:
            self.standbys.append(self._start_standby())

    def _hand_over(self, line: bytes) -> subprocess.Popen:
        """Give the job to a standby (a fresh launcher if none is alive)."""
        while self.standbys:
            child = self.standbys.pop(0)
            if child.poll() is None:
                try:
                    child.stdin.write(line)
                    child.stdin.close()
                    return child
                except (BrokenPipeError, OSError):
                    child.kill()
        child = self._start_standby()
        child.stdin.write(line)
        child.stdin.close()
        return child

    async def launch(self, record: dict, reason: str) -> None:
        job_id, spec = record["job_id"], record["resolved"]
        job_dir = self.job_dir(job_id)
        attempt = (record["launch"] or {}).get("attempt", 0) + 1
        log_dir = self.attempt_dir(job_id, attempt)
        log_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        await self.store.clear_progress(job_id)
        await self.store.control(job_id, pause=int(record["state"] == PAUSED), stop=0)
        entry = spec.get("entrypoint") or BUILTIN
        job = {"job_id": job_id, "job_dir": str(job_dir), "log_dir": str(log_dir),
               "nproc": spec["world_size"], "script": entry["script"],
               "module": entry["module"], "args": entry["args"],
               "working_dir": entry.get("working_dir") or str(job_dir), "env": entry["env"]}
        child = self._hand_over((json.dumps(job) + "\n").encode())
        self.standby_due = time.monotonic() + STANDBY_DELAY_S
        self.children[job_id] = child
        self.active[job_id] = spec["world_size"]
        launch = {"pid": child.pid, "start_ticks": start_ticks(child.pid),
                  "attempt": attempt, "launched_ns": time.time_ns()}
        fields = {"launch": launch}
        if not record["started_ns"]:
            fields["started_ns"] = time.time_ns()
        await self.store.update(job_id, **fields)
        record["launch"] = launch
        if record["cost"] is None and self.pricer is not None:
            ledger, note = self.pricer.open(spec)
            record["cost"] = ledger
            if note:
                await self.store.event(job_id, "note", state=record["state"], message=note)
        if record["state"] == QUEUED:
            moved = await self.store.move(job_id, RUNNING, reason,
                                          **({"cost": record["cost"]} if record["cost"] else {}))
            record.update(state=moved["state"])
            await self.send_cost(record)
        else:
            await self.store.event(job_id, "launch", state=record["state"], message=reason)
        log.info("job %s: launched attempt %d (pid %d): %s", job_id, attempt, child.pid,
                 reason)

    def ranks(self, job_id: str, launch: dict | None) -> dict:
        """The launcher's ranks.json of the current attempt: {"ranks": {rank: {pid,
        start_ticks}}, "failure": {...}}; {} before the ranks are forked."""
        if not launch:
            return {}
        try:
            return json.loads((self.attempt_dir(job_id, launch["attempt"]) /
                               "ranks.json").read_text())
        except (OSError, ValueError):
            return {}

    def _launcher_alive(self, job_id: str, launch: dict | None) -> bool:
        child = self.children.get(job_id)
        if child is not None:
            return child.poll() is None
        return bool(launch) and pid_alive(launch["pid"], launch.get("start_ticks"))

    async def kill(self, job_id: str, launch: dict | None, sig: int = signal.SIGKILL) -> None:
        """Signal the launcher's process group and every rank's: each rank runs in a
        session of its own, so killing the launcher alone would leave them running."""
        if launch and pid_alive(launch["pid"], launch.get("start_ticks")):
            signal_group(launch["pid"], sig)
        pids = list((await self.store.progress(job_id)).values())
        pids += self.ranks(job_id, launch).get("ranks", {}).values()
        for p in pids:
            if pid_alive(p.get("pid", 0), p.get("start_ticks")):
                signal_group(p["pid"], sig)
        child = self.children.get(job_id)
        if child is not None and sig == signal.SIGKILL:
            child.wait()

    def forget(self, job_id: str) -> None:
        self.children.pop(job_id, None)
        self.active.pop(job_id, None)
        self.last_step_event.pop(job_id, None)
        self.cancelled_at.pop(job_id, None)
        self.noted_no_sdk.discard(job_id)
        self.dead_seen.pop(job_id, None)
        self.cost_sent.pop(job_id, None)

    async def _end_placement(self, job_id: str) -> None:
        if self.placed.pop(job_id, None) is not None and self.placements is not None:
            await self.placements(job_id, {}, True)

    # -- startup ----------------------------------------------------------------------
    async def reattach(self) -> None:
        for job_id in await self.store.ids(limit=10_000):
            record = await self.store.get(job_id)
            if record is None or record["state"] not in (RUNNING, PAUSED):
                continue
            launch = record["launch"]
            if launch and pid_alive(launch["pid"], launch.get("start_ticks")):
                self.active[job_id] = record["resolved"]["world_size"]
                await self.store.event(job_id, "attach", state=record["state"],
                                       message=f"controller re-attached to pid "
                                       f"{launch['pid']}")
                log.info("job %s: re-attached to running workers (pid %d)", job_id,
                         launch["pid"])
            else:
                await self.failure(record, "the controller restarted and the job's workers "
                                   "were gone")

    # -- watching ---------------------------------------------------------------------
    async def tick(self) -> None:
        for job_id in list(self.active):
            record = await self.store.get(job_id)
            if record is None:
                self.forget(job_id)
                continue
            await self.watch(record)
        await self.watch_label_budgets()
        await self.schedule()
        self.keep_standby()

    async def schedule(self) -> None:
        for job_id in await self.store.queued():
            record = await self.store.get(job_id)
            if record is None or record["state"] != QUEUED:
                continue
            need = record["resolved"]["world_size"]
            if need > self.free_slots():
                return  # strict priority: nothing jumps the head of the queue
            await self.launch(record, f"launched on {need} slot(s)")

    async def watch(self, record: dict) -> None:
        job_id, launch = record["job_id"], record["launch"]
        progress = await self.store.progress(job_id)
        await self.sync_progress(record, progress)
        await self.sync_placement(record)
        if record["state"] in (RUNNING, PAUSED):
            await self.watch_cost(record)
        alive = self._launcher_alive(job_id, launch)
        if record["state"] == CANCELLED:
            first = self.cancelled_at.setdefault(job_id, time.monotonic())
            if alive and time.monotonic() - first > CANCEL_GRACE_S:
                await self.kill(job_id, launch)
            elif not alive:
                self.forget(job_id)
                await self._end_placement(job_id)
                await self.send_cost(record)  # the final figure
            return
        if record["state"] in ENDED:
            await self.kill(job_id, launch)
            self.forget(job_id)
            await self._end_placement(job_id)
            await self.send_cost(record)
            return
        rank0 = progress.get(0, {})
        if not alive:
            child = self.children.pop(job_id, None)
            code = child.returncode if child is not None else None
            failure = self.ranks(job_id, launch).get("failure")
            if code == 0 or (code is None and not failure and
                             rank0.get("state") == "completed"):
                self.forget(job_id)
                await self._end_placement(job_id)
                await self.send_cost(await self.store.move(
                    job_id, COMPLETED, f"completed {rank0['step']} steps" if rank0 else
                    "the script exited 0"))
            elif failure:
                how = (f"was killed by {failure['signal']}" if failure["signal"] else
                       f"exited with code {failure['exit_code']}")
                if progress.get(failure["rank"], {}).get("state") == "preempted":
                    how = "was preempted (SIGTERM) and exited after its emergency checkpoint"
                step = progress.get(failure["rank"], {}).get("step")
                await self.failure(record, f"rank {failure['rank']} (pid {failure['pid']}) "
                                   f"{how}" + (f" at step {step}" if step is not None else ""),
                                   self.rank_output(record, failure["rank"]))
            else:
                states = ", ".join(f"rank {r}: {p.get('state')} at step {p.get('step')}"
                                   for r, p in sorted(progress.items())) or "no rank reported"
                await self.failure(record, f"the launcher exited"
                                   f"{f' with code {code}' if code is not None else ''} "
                                   f"({states})")
            return
        dead = [(rank, p) for rank, p in sorted(progress.items()) if p.get("state") not in
                ("completed", "stopped", "preempted") and not pid_alive(p.get("pid", 0))]
        if dead:
            # The launcher notices first and names the rank that failed (it kills the
            # others): give it a moment before going by the pids alone.
            first = self.dead_seen.setdefault(job_id, time.monotonic())
            if time.monotonic() - first > LAUNCHER_GRACE_S:
                rank, p = dead[0]
                await self.failure(record, f"rank {rank} (pid {p.get('pid')}) died at step "
                                   f"{p.get('step')}", self.rank_output(record, rank))
            return
        if record["state"] == RUNNING:
            await self.check_hang(record, progress)

    def rank_output(self, record: dict, rank: int) -> str:
        entry = record["resolved"].get("entrypoint") or BUILTIN
        secrets = [v for k, v in entry["env"].items() if looks_secret(k)]
        launch = record["launch"] or {}
        return output_tail(self.attempt_dir(record["job_id"], launch.get("attempt", 0)) /
                           f"rank-{rank}.log", secrets)

    async def check_hang(self, record: dict, progress: dict[int, dict]) -> None:
        spec, launch = record["resolved"], record["launch"]
        now = time.time_ns()
        since_launch = (now - launch["launched_ns"]) / 1e9
        if not progress:  # no rank reports through mlpe.sdk (yet): nothing to watch
            quiet = min(STARTUP_GRACE_S, spec["hang_timeout_s"])
            if since_launch > quiet and record["job_id"] not in self.noted_no_sdk:
                self.noted_no_sdk.add(record["job_id"])
                await self.store.event(record["job_id"], "note", state=record["state"],
                                       message="no rank reports progress through mlpe.sdk: "
                                       "crashes are restarted, but hang detection needs "
                                       "run.report() in the training loop")
            return
        for rank in range(spec["world_size"]):
            p = progress.get(rank)
            if p is None:
                silent = since_launch - STARTUP_GRACE_S
            elif p.get("state") in ("launching", "starting"):  # not stepping yet: the first
                # collective waits for every rank, which on a loaded machine takes a while
                silent = (now - p["time_ns"]) / 1e9 - STARTUP_GRACE_S
            else:
                silent = (now - p["time_ns"]) / 1e9
            if silent > spec["hang_timeout_s"]:
                await self.failure(record, f"rank {rank} made no progress for {silent:.0f} s "
                                   f"(hang_timeout_s {spec['hang_timeout_s']:g})")
                return

    async def sync_placement(self, record: dict) -> None:
        """Publish which pids the job's ranks have once the launcher has forked them."""
        launch, job_id = record["launch"], record["job_id"]
        if not launch or self.placements is None or self.placed.get(job_id) == \
                launch["attempt"]:
            return
        ranks = self.ranks(job_id, launch).get("ranks")
        if ranks:
            self.placed[job_id] = launch["attempt"]
            await self.placements(job_id, ranks, False)

    async def sync_progress(self, record: dict, progress: dict[int, dict]) -> None:
        rank0 = progress.get(0)
        if not rank0:
            return
        job_id = record["job_id"]
        if rank0.get("state") == "running":  # up: a new standby no longer slows its start
            self.standby_due = min(self.standby_due, time.monotonic())
        fields = {}
        if rank0.get("step", 0) != record["step"]:
            fields.update(step=rank0["step"], loss=rank0.get("loss", record["loss"]),
                          tokens_per_s=rank0.get("tokens_per_s", record["tokens_per_s"]))
            now = time.monotonic()
            if now - self.last_step_event.get(job_id, 0) >= STEP_EVENT_EVERY_S or \
                    rank0["step"] == record["resolved"]["steps"]:
                self.last_step_event[job_id] = now
                await self.store.event(job_id, "step", state=record["state"],
                                       step=rank0["step"], loss=rank0.get("loss", 0.0))
        if rank0.get("checkpoint_step", 0) > record["checkpoint_step"]:
            fields["checkpoint_step"] = rank0["checkpoint_step"]
            await self.store.event(job_id, "checkpoint", state=record["state"],
                                   step=rank0["checkpoint_step"],
                                   message=f"checkpoint of step {rank0['checkpoint_step']} "
                                   "written")
        ledger = record["cost"]
        if ledger is not None and ledger.catch_up_step and \
                rank0.get("state") in ("running", "completed") and \
                rank0.get("step", 0) >= ledger.catch_up_step:
            lost_to = ledger.catch_up_step

            def caught_up(ledger: costs.Ledger) -> None:
                ledger.catch_up_step = 0

            fresh, now = await self.store.change_cost(job_id, caught_up, **fields)
            record.update(fields, cost=fresh["cost"], state=fresh["state"])
            fields = {}
            await self.store.event(job_id, "recovered", state=record["state"],
                                   step=rank0["step"], message=f"back at step {lost_to}, "
                                   "the step reached before the failure", time_ns=now,
                                   cost=cost_of(record, now))
            await self.send_cost(record)
        if fields:
            await self.store.update(job_id, **fields)
            record.update(fields)

    async def send_cost(self, record: dict) -> None:
        """Publish the job's cost now (mlpe.events.cost)."""
        cost = cost_of(record)
        if cost is not None and self.publish_cost is not None:
            self.cost_sent[record["job_id"]] = (time.monotonic(), cost.phase)
            await self.publish_cost(cost)

    async def watch_cost(self, record: dict) -> None:
        """Publish the cost every COST_EVERY_S and when its phase changed (a pause or resume
        through the API); alert at 80 % and 100 % of the budget and at 100 % apply its
        policy (pause after a checkpoint, stop, or only warn)."""
        if record["cost"] is None:
            return
        job_id = record["job_id"]
        sent, phase = self.cost_sent.get(job_id, (0.0, ""))
        if time.monotonic() - sent >= COST_EVERY_S or phase != record["cost"].phase:
            await self.send_cost(record)
        budget = record["resolved"].get("budget") or {}
        amount = budget.get("amount", 0.0)
        if not amount:
            return
        cost = cost_of(record)
        level, reached = budget_level(cost.total, amount), int(record.get("budget_level", 0))
        if level <= reached:
            return
        await self.store.update(job_id, budget_level=level)
        record["budget_level"] = level
        spent = (f"{cost.total:.4f} {cost.currency} of its budget {amount:g} "
                 f"{cost.currency} ({cost.total / amount:.0%})")
        policy = budget.get("policy", "pause") if level == 2 else "warn"
        for crossed in range(reached + 1, level + 1):  # both, when one look crossed both
            action = "" if crossed < level else \
                await self.act_on_budget(record, policy, spent, dry_run=True)
            await self.store.event(job_id, "budget", state=record["state"], step=record["step"],
                                   message=f"spent {spent}{action}", time_ns=cost.time_ns,
                                   cost=cost)
            log.warning("job %s: spent %s%s", job_id, spent, action)
            if self.budget_alerts is not None:
                await self.budget_alerts(record, cost, crossed, action)
        await self.act_on_budget(record, policy, spent)

    async def act_on_budget(self, record: dict, policy: str, spent: str,
                            dry_run: bool = False) -> str:
        """Apply a spent budget's policy to the job (pause after a checkpoint, or stop;
        warn does nothing); returns what was done, for the message. `dry_run`: only say."""
        job_id = record["job_id"]
        if policy == "pause" and record["state"] == RUNNING:
            if not await self.store.progress(job_id):
                return "; not paused: its ranks do not report through mlpe.sdk"
            if not dry_run:
                with contextlib.suppress(TransitionError):
                    moved = await self.store.move(job_id, PAUSED, f"paused: spent {spent}")
                    record.update(state=moved["state"], cost=moved["cost"])
                    await self.store.checkpoint_then_pause(job_id)  # the ranks save, then wait
            return "; checkpointed and paused (resume it to go on)"
        if policy == "stop" and record["state"] in (RUNNING, PAUSED, QUEUED):
            if not dry_run:
                with contextlib.suppress(TransitionError):
                    await self.store.move(job_id, CANCELLED, f"stopped: spent {spent}")
                    await self.cancel(record)
            return "; stopped"
        return ""

    async def watch_label_budgets(self) -> None:
        """Every COST_EVERY_S: each label budget (MLPE_BUDGETS) against the cost of all the
        jobs with its label. Alerts at 80 % and 100 % (once each); from 100 % on, its policy
        applies to each of those jobs once (a job resumed by hand runs on)."""
        if not self.label_budgets or time.monotonic() < self.label_budgets_due:
            return
        self.label_budgets_due = time.monotonic() + COST_EVERY_S
        records = [r for job_id in await self.store.ids(limit=10_000)
                   if (r := await self.store.get(job_id)) is not None]
        for budget in self.label_budgets:
            mine = [r for r in records if budget.covers(r)]
            costs = [c for r in mine if (c := cost_of(r)) is not None]
            total = sum(c.total for c in costs)
            currency = costs[0].currency if costs else ""
            level = budget_level(total, budget.amount)
            spent = (f"{total:.4f} {currency} of the {budget.label} budget "
                     f"{budget.amount:g} {currency} ({total / budget.amount:.0%})")
            reached = await self.store.label_budget_level(budget.label)
            if level > reached:
                await self.store.set_label_budget_level(budget.label, level)
                log.warning("label %s: spent %s", budget.label, spent)
                for crossed in range(reached + 1, level + 1):
                    if self.label_alerts is not None:
                        await self.label_alerts(budget, total, currency, crossed,
                                                [r["job_id"] for r in mine])
            if level < 2 or budget.policy == "warn":
                continue
            for record in mine:
                if record["state"] in ENDED or record.get("label_budget_acted"):
                    continue
                action = await self.act_on_budget(record, budget.policy, spent)
                await self.store.update(record["job_id"], label_budget_acted=1)
                await self.store.event(record["job_id"], "budget", state=record["state"],
                                       step=record["step"], message=f"spent {spent}{action}",
                                       cost=cost_of(record))

    async def failure(self, record: dict, reason: str, output: str = "") -> None:
        """Kill what is left of the job; restart it, or fail it when no restarts remain.
        `output`: the last lines of the failed rank's output, for the message."""
        job_id = record["job_id"]
        self.dead_seen.pop(job_id, None)
        await self.kill(job_id, record["launch"])
        self.children.pop(job_id, None)
        spec = record["resolved"]
        tail = f"\n--- last output ---\n{output}" if output else ""
        log.warning("job %s: %s", job_id, reason)
        if record["restarts"] < spec["max_restarts"]:
            restarts = record["restarts"] + 1

            def lost(ledger: costs.Ledger) -> None:
                # Lost: the relaunch and the steps since the last checkpoint, until the
                # job is back at the step it had reached (jobs off mlpe.sdk report none).
                if record["step"] > 0:
                    ledger.catch_up_step = max(ledger.catch_up_step, record["step"])

            fresh, now = await self.store.change_cost(job_id, lost, restarts=restarts)
            record.update(restarts=restarts, cost=fresh["cost"], state=fresh["state"])
            await self.store.event(job_id, "restart", state=record["state"],
                                   step=record["step"],
                                   message=f"restart {restarts}/{spec['max_restarts']}: "
                                   f"{reason}{tail}", time_ns=now, cost=cost_of(record, now))
            await self.send_cost(record)
            if self.alerts is not None:
                await self.alerts(record, reason)
            await self.launch(record, f"restart {restarts} from the last good checkpoint")
            return
        self.forget(job_id)
        await self._end_placement(job_id)
        with contextlib.suppress(TransitionError):
            await self.send_cost(await self.store.move(
                job_id, FAILED, f"{reason}; no restarts left (max_restarts "
                f"{spec['max_restarts']}){tail}"))
        if self.alerts is not None:
            await self.alerts(record, f"{reason}; the job failed")

    # -- requests from the API -----------------------------------------------------------
    async def cancel(self, record: dict) -> None:
        job_id = record["job_id"]
        await self.store.control(job_id, stop=1, pause=0)
        if record["launch"] and job_id in self.active:
            self.cancelled_at[job_id] = time.monotonic()
            if not await self.store.progress(job_id):  # not on mlpe.sdk: cannot be told
                await self.kill(job_id, record["launch"], signal.SIGTERM)

    def detach(self) -> None:
        """Leave the workers running: a restarted controller re-attaches to them. The
        standbys go (their stdin closes; they exit)."""
        self.children.clear()
        for child in self.standbys:
            with contextlib.suppress(OSError):
                child.stdin.close()
        self.standbys.clear()


def budget_level(total: float, amount: float) -> int:
    """0 under BUDGET_WARN of `amount`, 1 from it, 2 from all of it."""
    return 2 if total >= amount else 1 if total >= BUDGET_WARN * amount else 0


def default_slots() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return os.cpu_count() or 1
