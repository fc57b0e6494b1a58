"""`mlpe optimizer`: the Optimizer gRPC service (grpc.aio) with health and reflection.

PlanTraining answers are cached in Redis by the request's hash (a day; plans depend only
on the request). The search runs in a thread pool so one long search does not stall the
other calls. Planning is read-only: no token needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc

from mlpe.common import logs, prices
from mlpe.common.grpc_server import start_server
from mlpe.common.settings import Settings
from mlpe.optimizer import service
from mlpe.optimizer.errors import PlanInputError
from mlpe.v1 import optimizer_pb2 as o
from mlpe.v1 import optimizer_pb2_grpc

log = logging.getLogger("mlpe.optimizer")
SERVICE = o.DESCRIPTOR.services_by_name["Optimizer"].full_name
CACHE_TTL_S = 24 * 3600


class Optimizer(optimizer_pb2_grpc.OptimizerServicer):
    def __init__(self, settings: Settings, cache, pool: ThreadPoolExecutor):
        self.settings, self.cache, self.pool = settings, cache, pool
        # Read at start: a broken price table stops the service with its file and line.
        self.prices = prices.load(settings.prices_path)
        # Cached plans carry their costs: a new price table is a new cache.
        self.prices_digest = hashlib.sha256(repr(self.prices).encode()).hexdigest()[:12]
        self.ns = settings.control_namespace  # plans are cached beside control's keys
        self.stats = {"plans": 0, "cache_hits": 0}

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def PlanTraining(self, request, context):
        key = f"{self.ns}:plan:{self.prices_digest}:{service.request_hash(request)}"
        self.stats["plans"] += 1
        cached = await self._cache_get(key)
        if cached is not None:
            self.stats["cache_hits"] += 1
            response = o.PlanResponse.FromString(cached)
            response.cached = True
            return response
        try:
            response = await self._run(service.plan, request, self.prices)
        except PlanInputError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err.field}: {err.reason}")
        await self._cache_set(key, response.SerializeToString())
        return response

    async def ExplainPlan(self, request, context):
        try:
            text = await self._run(service.explain, request)
        except PlanInputError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err.field}: {err.reason}")
        return o.ExplainPlanResponse(text=text)

    async def AdviseJob(self, request, context):
        if not request.job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id: required")
        window = request.window_s or 300
        if not 10 <= window <= 7 * 86400:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"window_s: between 10 and 604800, got {request.window_s}")
        try:
            recs, summary = await self._run(advise, self.settings, request.job_id, window)
        except OSError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"InfluxDB not reachable: {err}")
        return o.AdviseJobResponse(job_id=request.job_id, summary=summary, recommendations=[
            o.Recommendation(title=r.title, evidence=r.evidence, severity=r.severity,
                             expected_gain_pct=r.expected_gain_pct) for r in recs])

    async def _cache_get(self, key: str) -> bytes | None:
        if self.cache is None:
            return None
        try:
            return await self.cache.get(key)
        except Exception as err:  # noqa: BLE001 - a cache outage must not fail a plan
            log.warning("plan cache unavailable: %s", err)
            return None

    async def _cache_set(self, key: str, value: bytes) -> None:
        if self.cache is None:
            return
        try:
            await self.cache.set(key, value, ex=CACHE_TTL_S)
        except Exception as err:  # noqa: BLE001
            log.warning("plan cache unavailable: %s", err)


def advise(settings: Settings, job_id: str, window_s: int):
    from mlpe.common.tokens import influx_token
    from mlpe.optimizer.advise import gather, recommend

    token = influx_token(settings)
    evidence = gather(settings, token, job_id, window_s)
    summary = (f"last {window_s} s of job {job_id}: {len(evidence.gpus)} GPUs on "
               f"{len({n for n, _ in evidence.gpus})} nodes, {len(evidence.alerts)} firing "
               "alerts")
    micro_batch, gain = micro_batch_gain(settings, job_id, evidence)
    return recommend(evidence, gain, micro_batch), summary


def micro_batch_gain(settings: Settings, job_id: str, evidence) -> tuple[int | None,
                                                                        float | None]:
    """(micro-batch, predicted % tokens/s from doubling it) for a job `mlpe control` runs
    (its spec, from control's GetJob); the GPU type is the preset whose memory is nearest
    to what the job's GPUs report. (None, None) for other jobs, or when control is not
    reachable."""
    from mlpe.common.grpc_server import control_channel
    from mlpe.common.jobs import model_config, resolve
    from mlpe.optimizer.hardware import GPUS, Cluster
    from mlpe.optimizer.models import worker_model
    from mlpe.optimizer.timing import plan_time
    from mlpe.v1 import control_pb2, control_pb2_grpc

    totals = [g["mem_total_mean"] / 1024 for g in evidence.gpus.values()
              if g.get("mem_total_mean")]
    if not totals:
        return None, None
    try:
        with control_channel(settings) as channel:
            job = control_pb2_grpc.TrainingControlStub(channel).GetJob(
                control_pb2.JobRequest(job_id=job_id), timeout=5)
    except grpc.RpcError as err:  # NOT_FOUND: not control's job; UNAVAILABLE: no control
        if err.code() != grpc.StatusCode.NOT_FOUND:
            log.warning("control at %s not asked about %s: %s", settings.control_address,
                        job_id, err.code().name)
        return None, None
    except OSError as err:  # MLPE_CONTROL_TLS_CA unreadable: advice without the gain
        log.warning("control not asked about %s: %s", job_id, err)
        return None, None
    spec, problems = resolve(job.spec)
    if problems:
        return None, None
    model = worker_model(model_config(spec))
    gpu = min(GPUS.values(), key=lambda g: abs(g.memory_gib - max(totals)))
    world, mb, batch = spec["world_size"], spec["micro_batch"], spec["global_batch"]
    if batch % (2 * mb * world):
        return mb, None  # doubling would not divide the global batch
    cluster = Cluster(1, world, gpu)
    seq = spec["model"]["seq_len"]
    now = plan_time(model, cluster, seq, batch, dp=world, micro_batch=mb,
                    grad_accum=batch // (mb * world))[1]
    doubled = plan_time(model, cluster, seq, batch, dp=world, micro_batch=2 * mb,
                        grad_accum=batch // (2 * mb * world))[1]
    return mb, round(100 * (doubled / now - 1), 1)


async def serve(settings: Settings, address: str, cache=None,
                credentials=None) -> tuple[grpc.aio.Server, int, Optimizer]:
    servicer = Optimizer(settings, cache, ThreadPoolExecutor(max_workers=2))
    server, port = await start_server(
        address, SERVICE,
        lambda s: optimizer_pb2_grpc.add_OptimizerServicer_to_server(servicer, s), credentials)
    return server, port, servicer


def run(args, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args, settings: Settings) -> int:
    import redis.asyncio as redis

    logs.configure("optimizer", settings.log_level, settings.log_format)
    cache = None if args.no_cache else redis.Redis.from_url(settings.redis_url)
    listen = args.listen or f"0.0.0.0:{settings.optimizer_port}"
    try:
        server, port, servicer = await serve(settings, listen, cache)
    except prices.PriceError as err:
        log.error("optimizer not started: %s", err)
        return 2
    log.info("optimizer serving on %s (port %d), cache %s", listen, port,
             "off" if cache is None else "on")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=5)
    if cache is not None:
        await cache.aclose()
    log.info("optimizer stopped after %s", servicer.stats)
    return 0
