"""The TrainingControl gRPC service (grpc.aio), with health, reflection, bearer-token
auth on state-changing calls, an audit log of each of them, and TLS when configured."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from pathlib import Path

import grpc
from redis.exceptions import ResponseError

from mlpe.common import jobs as job_spec
from mlpe.common.grpc_server import start_server
from mlpe.control import scripts
from mlpe.control.store import (
    CANCELLED,
    ENDED,
    PAUSED,
    RUNNING,
    JobStore,
    TransitionError,
    event_proto,
    state_name,
    to_proto,
)
from mlpe.control.supervisor import Supervisor
from mlpe.v1 import control_pb2, control_pb2_grpc

log = logging.getLogger("mlpe.control")
SERVICE = control_pb2.DESCRIPTOR.services_by_name["TrainingControl"].full_name


class TrainingControl(control_pb2_grpc.TrainingControlServicer):
    def __init__(self, store: JobStore, supervisor: Supervisor, token: str,
                 script_roots: tuple[Path, ...] = ()):
        self.store, self.supervisor, self.token = store, supervisor, token
        self.script_roots = script_roots

    # -- helpers ----------------------------------------------------------------------
    async def _authorize(self, context, what: str, job_id: str = "") -> str:
        """The caller's name for the audit log; aborts UNAUTHENTICATED without the token."""
        metadata = dict(context.invocation_metadata())
        who = f"{metadata.get('mlpe-user', 'unknown')}@{context.peer()}"
        given = metadata.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            await self.store.audit(who, what, job_id, "refused: no valid bearer token")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{what} changes state: send 'authorization: Bearer <token>' "
                                "(the token is in $MLPE_CONTROL_TOKEN or the controller's "
                                "secrets folder)")
        return who

    async def _record(self, job_id: str, context) -> dict:
        if not job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id: required")
        record = await self.store.get(job_id)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}")
        return record

    async def _job(self, job_id: str) -> control_pb2.Job:
        record = await self.store.get(job_id)
        return to_proto(record, await self.store.queue_position(job_id))

    async def _move(self, context, who: str, what: str, job_id: str, to: int,
                    message: str) -> dict:
        try:
            record = await self.store.move(job_id, to, message)
        except TransitionError as err:
            await self.store.audit(who, what, job_id, f"refused: {err}")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        await self.store.audit(who, what, job_id, f"ok: now {state_name(to)}")
        return record

    # -- RPCs ---------------------------------------------------------------------------
    async def SubmitJob(self, request, context):
        who = await self._authorize(context, "SubmitJob")
        resolved, problems = job_spec.resolve(request.spec)
        if resolved["entrypoint"] is not None and not problems:
            problems += scripts.check(resolved["entrypoint"], self.script_roots)
        if resolved["hf"] is not None and not problems:
            problems += scripts.check_model(resolved["hf"], self.script_roots)
        if resolved["world_size"] > self.supervisor.slots:
            problems.append(f"world_size: {resolved['world_size']} ranks, but this controller "
                            f"has {self.supervisor.slots} slot(s)")
        if problems:
            await self.store.audit(who, "SubmitJob", "", "refused: invalid spec")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "invalid job spec: " + "; ".join(problems))
        job_id = await self.store.create(request.spec, resolved)
        await self.store.audit(who, "SubmitJob", job_id, "ok: queued")
        log.info("job %s submitted by %s", job_id, who)
        return await self._job(job_id)

    async def GetJob(self, request, context):
        await self._record(request.job_id, context)
        return await self._job(request.job_id)

    async def ListJobs(self, request, context):
        limit = request.limit or 100
        if limit < 0 or limit > 10_000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"limit: between 0 and 10000, got {request.limit}")
        wanted = set(request.states)
        jobs = []
        for job_id in await self.store.ids(limit=10_000):
            job = await self._job(job_id)
            if not wanted or job.state in wanted:
                jobs.append(job)
            if len(jobs) >= limit:
                break
        return control_pb2.ListJobsResponse(jobs=jobs)

    async def PauseJob(self, request, context):
        who = await self._authorize(context, "PauseJob", request.job_id)
        record = await self._record(request.job_id, context)
        if record["state"] == RUNNING and record["launch"] and \
                not await self.store.progress(request.job_id):
            msg = (f"job {request.job_id}'s ranks do not report through mlpe.sdk (yet), so "
                   "they cannot be told to pause; cancel it, or use run.poll() in the script")
            await self.store.audit(who, "PauseJob", request.job_id, f"refused: {msg}")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, msg)
        await self._move(context, who, "PauseJob", request.job_id, PAUSED, "paused by " + who)
        await self.store.control(request.job_id, pause=1)
        return await self._job(request.job_id)

    async def ResumeJob(self, request, context):
        who = await self._authorize(context, "ResumeJob", request.job_id)
        record = await self._record(request.job_id, context)
        if record["state"] != PAUSED:
            msg = (f"job {request.job_id} is {state_name(record['state'])}; only a paused job "
                   "can be resumed")
            await self.store.audit(who, "ResumeJob", request.job_id, f"refused: {msg}")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, msg)
        await self._move(context, who, "ResumeJob", request.job_id, RUNNING,
                         "resumed by " + who)
        await self.store.control(request.job_id, pause=0)
        return await self._job(request.job_id)

    async def CancelJob(self, request, context):
        who = await self._authorize(context, "CancelJob", request.job_id)
        record = await self._record(request.job_id, context)
        await self._move(context, who, "CancelJob", request.job_id, CANCELLED,
                         "cancelled by " + who)
        await self.supervisor.cancel(record)
        return await self._job(request.job_id)

    async def CheckpointNow(self, request, context):
        who = await self._authorize(context, "CheckpointNow", request.job_id)
        record = await self._record(request.job_id, context)
        if record["state"] not in (RUNNING, PAUSED):
            msg = (f"job {request.job_id} is {state_name(record['state'])}; only a running "
                   "or paused job can be checkpointed")
            await self.store.audit(who, "CheckpointNow", request.job_id, f"refused: {msg}")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, msg)
        seq = await self.store.request_checkpoint(request.job_id)
        await self.store.event(request.job_id, "checkpoint", state=record["state"],
                               step=record["step"], message=f"checkpoint {seq} requested by "
                               f"{who}")
        await self.store.audit(who, "CheckpointNow", request.job_id, "ok: requested")
        return await self._job(request.job_id)

    async def StreamJobEvents(self, request, context):
        await self._record(request.job_id, context)
        after = request.after_id or "0"
        while True:
            try:
                events = await self.store.events(request.job_id, after, block_ms=1000)
            except ResponseError as err:  # a bad after_id is the client's error
                if "Invalid stream ID" in str(err):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"after_id {request.after_id!r}: not an event id")
                raise
            for event_id, f in events:
                after = event_id
                yield event_proto(request.job_id, event_id, f)
            if not events:
                record = await self.store.get(request.job_id)
                if record["state"] in ENDED:
                    return


async def serve(store: JobStore, supervisor: Supervisor, token: str, address: str,
                credentials: grpc.ServerCredentials | None = None,
                script_roots: tuple[Path, ...] = ()) -> tuple[grpc.aio.Server, int]:
    """Start the server (control, health, reflection); returns it and its bound port."""
    servicer = TrainingControl(store, supervisor, token, script_roots)
    return await start_server(address, SERVICE, lambda server: control_pb2_grpc.
                              add_TrainingControlServicer_to_server(servicer, server),
                              credentials)


async def supervise(supervisor: Supervisor, stop: asyncio.Event) -> None:
    from mlpe.control.supervisor import TICK_S

    await supervisor.reattach()
    while not stop.is_set():
        try:
            await supervisor.tick()
        except Exception:  # one bad tick (Redis blip) must not end the watch
            log.exception("supervisor tick failed; carrying on")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), TICK_S)


