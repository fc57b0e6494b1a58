"""`mlpe control`: the training-control service (gRPC) and its job supervisor."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

from mlpe.common import logs
from mlpe.common.settings import Settings, SettingsError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "control",
        help="training-control service (gRPC): submit, watch, pause, resume, cancel, "
        "checkpoint jobs; restarts crashed or hung jobs from their last good checkpoint",
        description="Serves mlpe.v1.TrainingControl on $MLPE_CONTROL_PORT (50052) with "
        "health and reflection; job state lives in Redis, so a restarted controller "
        "re-attaches to running workers. State-changing calls need the bearer token "
        "$MLPE_CONTROL_TOKEN (generated into the secrets folder when unset). TLS when "
        "$MLPE_CONTROL_TLS_CERT and $MLPE_CONTROL_TLS_KEY name a certificate and its key.",
    )
    p.add_argument("--slots", type=int, default=None,
                   help="ranks that may run at once (default: the GPUs, or the CPU cores "
                   "without one)")
    p.add_argument("--jobs-dir", type=Path, default=None,
                   help="where job folders go (default: <state dir>/jobs)")
    p.add_argument("--listen", default=None,
                   help="address to serve on (default 0.0.0.0:$MLPE_CONTROL_PORT)")
    p.set_defaults(func=run)


def server_credentials(settings: Settings):
    import grpc

    if settings.control_tls_cert is None:
        return None
    try:
        return grpc.ssl_server_credentials([(settings.control_tls_key.read_bytes(),
                                             settings.control_tls_cert.read_bytes())])
    except OSError as err:
        raise SettingsError(f"TLS certificate or key unreadable: {err}") from None


def alert_sender(settings: Settings, log):
    """An async callable publishing a job alert to mlpe.alerts (best effort: a Kafka
    outage is logged, never allowed to stall the supervisor)."""
    from aiokafka import AIOKafkaProducer

    from mlpe.common.alerts import CRITICAL, WARNING, build
    from mlpe.common.topics import ALERTS

    producer: AIOKafkaProducer | None = None

    async def send(record: dict, reason: str) -> None:
        nonlocal producer
        import time

        failed = "the job failed" in reason
        now = time.time_ns()
        alert = build("control", "job_failed" if failed else "job_restarted",
                      CRITICAL if failed else WARNING, True,
                      {"job": record["job_id"], "name": record["resolved"]["name"] or "-"},
                      record["restarts"], record["resolved"]["max_restarts"], now, now,
                      f"job {record['job_id']} {'failed' if failed else 'restarted'}",
                      f"{reason}; restarts {record['restarts']} of "
                      f"{record['resolved']['max_restarts']}, last step {record['step']}")
        try:
            if producer is None:
                producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
                await asyncio.wait_for(producer.start(), 5)
            await asyncio.wait_for(producer.send_and_wait(
                ALERTS.name, alert.SerializeToString(), key=alert.fingerprint.encode()), 5)
        except Exception as err:  # noqa: BLE001 - alerts are best effort here
            log.warning("alert not published", error=str(err), job=record["job_id"])
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()
            producer = None

    return send


def run(args, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args, settings: Settings) -> int:
    import redis.asyncio as redis

    from mlpe.common.jobs import JobKeys
    from mlpe.common.tokens import control_token
    from mlpe.control.server import serve, supervise
    from mlpe.control.store import JobStore
    from mlpe.control.supervisor import Supervisor, default_slots

    log = logs.configure("control", settings.log_level, settings.log_format)
    if args.slots is None:
        args.slots = default_slots()
    if args.slots < 1:
        raise SettingsError(f"--slots must be ≥ 1, got {args.slots}")
    token = control_token(settings, create=True)
    logs.register_secret(token)
    credentials = server_credentials(settings)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        await client.ping()
    except (OSError, redis.ConnectionError) as err:
        log.error("Redis is not reachable; start it with `mlpe stack up`",
                  url=settings.redis_url, error=str(err))
        return 1
    store = JobStore(client, JobKeys(settings.control_namespace))
    supervisor = Supervisor(store, args.jobs_dir or settings.state_dir / "jobs", args.slots,
                            alerts=alert_sender(settings, log))
    listen = args.listen or f"0.0.0.0:{settings.control_port}"
    server, port = await serve(store, supervisor, token, listen, credentials)
    log.info("control serving", address=listen, port=port, slots=args.slots,
             tls=credentials is not None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await supervise(supervisor, stop)
    await server.stop(grace=5)
    supervisor.detach()
    await client.aclose()
    log.info("control stopped; running jobs keep running and are re-attached on restart")
    return 0
