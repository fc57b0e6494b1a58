"""Jobs in Redis: the record, the priority queue, the event log and the audit log.

Everything the controller knows lives here, so a restarted controller carries on from
Redis alone. States move only along the state machine's edges (`TRANSITIONS`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import redis.asyncio as redis
from google.protobuf import json_format

from mlpe.common.jobs import JobKeys
from mlpe.common.logs import looks_secret
from mlpe.control.costs import Ledger, phase_of
from mlpe.v1 import control_pb2

S = control_pb2.JobState
QUEUED, RUNNING, PAUSED = S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING, S.JOB_STATE_PAUSED
COMPLETED, FAILED, CANCELLED = S.JOB_STATE_COMPLETED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED
ENDED = (COMPLETED, FAILED, CANCELLED)
TRANSITIONS = {
    QUEUED: {RUNNING, CANCELLED, FAILED},
    RUNNING: {PAUSED, COMPLETED, FAILED, CANCELLED, QUEUED},  # QUEUED: waits to restart
    PAUSED: {RUNNING, CANCELLED, FAILED, QUEUED},
}
EVENTS_KEPT = 20_000


def state_name(state: int) -> str:
    return S.Name(state).removeprefix("JOB_STATE_").lower()


class TransitionError(ValueError):
    pass


class JobStore:
    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.r, self.keys = client, keys
        # The API and the supervisor share one event loop: a job's state and cost ledger
        # change under its lock, so neither writes back a ledger the other has moved on.
        self.locks: dict[str, asyncio.Lock] = {}

    # -- records ----------------------------------------------------------------------
    async def create(self, spec: control_pb2.JobSpec, resolved: dict) -> str:
        job_id = f"job-{secrets.token_hex(4)}"
        now = time.time_ns()
        seq = await self.r.incr(self.keys.seq)
        await self.r.hset(self.keys.job(job_id), mapping={
            "spec": spec.SerializeToString(), "resolved": json.dumps(resolved),
            "state": QUEUED, "step": 0, "checkpoint_step": 0, "restarts": 0,
            "submitted_ns": now, "started_ns": 0, "ended_ns": 0, "message": "",
            "loss": 0.0, "tokens_per_s": 0.0, "seq": seq})
        await self.r.zadd(self.keys.jobs, {job_id: now})
        await self.enqueue(job_id, resolved["priority"], seq)
        await self.event(job_id, "state", state=QUEUED, message="submitted")
        return job_id

    async def enqueue(self, job_id: str, priority: int, seq: int) -> None:
        # Higher priority first, then submit order.
        await self.r.zadd(self.keys.queue, {job_id: -priority * 1e12 + seq})

    async def get(self, job_id: str) -> dict | None:
        raw = await self.r.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        record = {k.decode(): v for k, v in raw.items()}
        for name in ("state", "step", "checkpoint_step", "restarts", "submitted_ns",
                     "started_ns", "ended_ns", "seq", "budget_level",
                     "label_budget_acted"):
            record[name] = int(record.get(name, 0))
        for name in ("loss", "tokens_per_s"):
            record[name] = float(record.get(name, 0))
        record["message"] = record.get("message", b"").decode()
        record["resolved"] = json.loads(record["resolved"])
        record["launch"] = json.loads(record["launch"]) if record.get("launch") else None
        record["cost"] = Ledger.from_json(record.get("cost"))
        record["job_id"] = job_id
        return record

    async def update(self, job_id: str, **fields) -> None:
        if "launch" in fields:
            fields["launch"] = json.dumps(fields["launch"]) if fields["launch"] else ""
        if "cost" in fields:
            fields["cost"] = fields["cost"].to_json()
        await self.r.hset(self.keys.job(job_id), mapping=fields)

    async def move(self, job_id: str, to: int, message: str = "", **fields) -> dict:
        """Change state along an allowed edge; records an event. The job's cost ledger
        (given in `fields`, or the record's) switches phase at the event's time. Raises
        TransitionError."""
        async with self.locks.setdefault(job_id, asyncio.Lock()):
            record = await self.get(job_id)
            if to not in TRANSITIONS.get(record["state"], set()):
                raise TransitionError(f"job {job_id} is {state_name(record['state'])}; it "
                                      f"cannot become {state_name(to)}")
            now = time.time_ns()
            if to in ENDED:
                fields["ended_ns"] = now
            ledger = fields.get("cost") or record["cost"]
            if ledger is not None:
                ledger.switch(phase_of(to, ledger), now)
                fields["cost"] = ledger
            await self.update(job_id, state=to, message=message, **fields)
            if to != QUEUED:
                await self.r.zrem(self.keys.queue, job_id)
            record.update(fields, state=to, message=message)
            await self.event(job_id, "state", state=to, message=message, time_ns=now,
                             cost=cost_of(record, now))
        if to in ENDED:
            self.locks.pop(job_id, None)
        return record

    async def change_cost(self, job_id: str, change, **fields) -> tuple[dict, int]:
        """Under the job's lock: its fresh ledger changed by `change(ledger)` and switched
        to the phase its state now means, saved with `fields`. Returns the record and the
        time of the switch (for the event that tells of it)."""
        async with self.locks.setdefault(job_id, asyncio.Lock()):
            record = await self.get(job_id)
            now = time.time_ns()
            ledger = record["cost"]
            if ledger is not None:
                change(ledger)
                ledger.switch(phase_of(record["state"], ledger), now)
                fields["cost"] = ledger
            if fields:
                await self.update(job_id, **fields)
            record.update(fields)
            return record, now

    async def ids(self, limit: int = 100) -> list[str]:
        return [i.decode() for i in await self.r.zrevrange(self.keys.jobs, 0, limit - 1)]

    async def queued(self) -> list[str]:
        return [i.decode() for i in await self.r.zrange(self.keys.queue, 0, -1)]

    async def queue_position(self, job_id: str) -> int:
        rank = await self.r.zrank(self.keys.queue, job_id)
        return 0 if rank is None else rank + 1

    async def label_budget_level(self, label: str) -> int:
        return int(await self.r.hget(self.keys.label_budgets, label) or 0)

    async def set_label_budget_level(self, label: str, level: int) -> None:
        await self.r.hset(self.keys.label_budgets, label, level)

    # -- workers' side --------------------------------------------------------------------
    async def progress(self, job_id: str) -> dict[int, dict]:
        raw = await self.r.hgetall(self.keys.ranks(job_id))
        return {int(k): json.loads(v) for k, v in raw.items()}

    async def clear_progress(self, job_id: str) -> None:
        await self.r.delete(self.keys.ranks(job_id))

    async def control(self, job_id: str, **fields) -> None:
        await self.r.hset(self.keys.control(job_id), mapping=fields)

    async def request_checkpoint(self, job_id: str) -> int:
        return await self.r.hincrby(self.keys.control(job_id), "checkpoint", 1)

    async def checkpoint_then_pause(self, job_id: str) -> None:
        """A checkpoint request and the pause in one transaction: a rank that read the one
        without the other would save, step once more and pause a step past its save."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.keys.control(job_id), "checkpoint", 1)
            pipe.hset(self.keys.control(job_id), "pause", 1)
            await pipe.execute()

    # -- logs -----------------------------------------------------------------------------
    async def event(self, job_id: str, kind: str, *, state: int = 0, step: int = 0,
                    loss: float = 0.0, message: str = "", time_ns: int | None = None,
                    cost: control_pb2.JobCost | None = None) -> None:
        fields = {"kind": kind, "state": state, "step": step, "loss": loss,
                  "message": message, "time_ns": time_ns or time.time_ns()}
        if cost is not None:
            fields["cost"] = json_format.MessageToJson(cost, indent=None)
        await self.r.xadd(self.keys.events(job_id), fields, maxlen=EVENTS_KEPT,
                          approximate=True)

    async def events(self, job_id: str, after: str, block_ms: int = 0):
        """[(id, fields)] after the event id `after` ("0" = from the first)."""
        got = await self.r.xread({self.keys.events(job_id): after}, count=500,
                                 block=block_ms or None)
        return [(i.decode(), {k.decode(): v.decode() for k, v in f.items()})
                for _, entries in got for i, f in entries]

    async def audit(self, who: str, what: str, job_id: str, outcome: str) -> None:
        await self.r.xadd(self.keys.audit, {"who": who, "what": what, "job_id": job_id,
                                       "outcome": outcome, "time_ns": time.time_ns()},
                          maxlen=100_000, approximate=True)


def cost_of(record: dict, now_ns: int | None = None) -> control_pb2.JobCost | None:
    """The job's cost as of `now_ns` (default: now, or its end); None before its first
    launch."""
    ledger = record["cost"]
    if ledger is None:
        return None
    if now_ns is None:
        now_ns = record.get("ended_ns") or time.time_ns()
    resolved = record["resolved"]
    return ledger.proto(record["job_id"], resolved["name"], now_ns,
                        resolved.get("budget", {}).get("amount", 0.0))


def event_proto(job_id: str, event_id: str, f: dict) -> control_pb2.JobEvent:
    event = control_pb2.JobEvent(
        id=event_id, job_id=job_id, time_ns=int(f["time_ns"]), kind=f["kind"],
        state=int(f["state"]), step=int(f["step"]), loss=float(f["loss"]),
        message=f["message"])
    if f.get("cost"):
        json_format.Parse(f["cost"], event.cost)
    return event


def to_proto(record: dict, queue_position: int = 0) -> control_pb2.Job:
    """The job as the API shows it: a script job's secret-looking env values masked
    (GetJob and ListJobs need no token)."""
    spec = control_pb2.JobSpec()
    spec.ParseFromString(record["spec"])
    for key in spec.entrypoint.env:
        if looks_secret(key):
            spec.entrypoint.env[key] = "***"
    return control_pb2.Job(
        job_id=record["job_id"], spec=spec, state=record["state"], step=record["step"],
        checkpoint_step=record["checkpoint_step"], restarts=record["restarts"],
        submitted_ns=record["submitted_ns"], started_ns=record["started_ns"],
        ended_ns=record["ended_ns"], message=record["message"], loss=record["loss"],
        tokens_per_s=record["tokens_per_s"], queue_position=queue_position,
        cost=cost_of(record))
