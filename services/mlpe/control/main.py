"""`mlpe control`: the training-control service (gRPC) and its job supervisor."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

from mlpe.common import logs, prices
from mlpe.common.settings import Settings, SettingsError
from mlpe.control import budgets, costs


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
    p.add_argument("--standby", type=int, default=1, metavar="N",
                   help="launchers kept ready with torch imported, so a launch or restart "
                   "forks ranks instead of starting interpreters (default 1; 0 = none)")
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


class KafkaEvents:
    """What the controller publishes: job alerts to mlpe.alerts and job placements to
    mlpe.placement. Best effort: a Kafka outage is logged, never allowed to stall the
    supervisor (a placement missed is published again at the next launch)."""

    def __init__(self, settings: Settings, log):
        self.settings, self.log = settings, log
        self.producer = None

    async def _send(self, topic: str, key: bytes, value: bytes, job_id: str) -> None:
        from aiokafka import AIOKafkaProducer

        try:
            if self.producer is None:
                self.producer = AIOKafkaProducer(
                    bootstrap_servers=self.settings.kafka_bootstrap)
                await asyncio.wait_for(self.producer.start(), 5)
            await asyncio.wait_for(self.producer.send_and_wait(topic, value, key=key), 5)
        except Exception as err:  # noqa: BLE001 - best effort, see the class docstring
            self.log.warning("not published", topic=topic, error=str(err), job=job_id)
            if self.producer is not None:
                with contextlib.suppress(Exception):
                    await self.producer.stop()
            self.producer = None

    async def alert(self, record: dict, reason: str) -> None:
        import time

        from mlpe.common.alerts import CRITICAL, WARNING, build
        from mlpe.common.topics import ALERTS

        failed = "the job failed" in reason
        now = time.time_ns()
        alert = build("control", "job_failed" if failed else "job_restarted",
                      CRITICAL if failed else WARNING, True,
                      {"job": record["job_id"], "name": record["resolved"]["name"] or "-"},
                      record["restarts"], record["resolved"]["max_restarts"], now, now,
                      f"job {record['job_id']} {'failed' if failed else 'restarted'}",
                      f"{reason}; restarts {record['restarts']} of "
                      f"{record['resolved']['max_restarts']}, last step {record['step']}")
        await self._send(ALERTS.name, alert.fingerprint.encode(), alert.SerializeToString(),
                         record["job_id"])

    async def cost(self, cost) -> None:
        from mlpe.common.topics import COST_EVENTS

        await self._send(COST_EVENTS.name, cost.job_id.encode(), cost.SerializeToString(),
                         cost.job_id)

    async def budget_alert(self, record: dict, cost, level: int, action: str) -> None:
        """job_budget, firing at 80 % (warning) and at 100 % (critical) of the budget:
        one alert each (the threshold is a label), so the second is not a repeat."""
        from mlpe.common.alerts import CRITICAL, WARNING, build
        from mlpe.common.topics import ALERTS

        share = "100%" if level == 2 else "80%"
        alert = build("control", "job_budget", CRITICAL if level == 2 else WARNING, True,
                      {"job": record["job_id"], "name": record["resolved"]["name"] or "-",
                       "threshold": share},
                      cost.total, cost.budget, cost.time_ns, cost.time_ns,
                      f"job {record['job_id']} spent {share} of its budget",
                      f"{cost.total:.2f} {cost.currency} of {cost.budget:g} {cost.currency} "
                      f"(useful {cost.useful:.2f}, failures {cost.failure:.2f}, paused "
                      f"{cost.paused:.2f}){action}")
        await self._send(ALERTS.name, alert.fingerprint.encode(), alert.SerializeToString(),
                         record["job_id"])

    async def label_budget_alert(self, budget, total: float, currency: str, level: int,
                                 jobs: list[str]) -> None:
        """label_budget, at 80 % (warning) and 100 % (critical) of a label's budget."""
        import time

        from mlpe.common.alerts import CRITICAL, WARNING, build
        from mlpe.common.topics import ALERTS

        share = "100%" if level == 2 else "80%"
        now = time.time_ns()
        shown = ", ".join(jobs[:10]) + (f" and {len(jobs) - 10} more" if len(jobs) > 10 else "")
        action = {"pause": "; its running jobs are checkpointed and paused",
                  "stop": "; its jobs are stopped"}.get(budget.policy, "") if level == 2 else ""
        alert = build("control", "label_budget", CRITICAL if level == 2 else WARNING, True,
                      {"label": budget.label, "threshold": share}, total, budget.amount,
                      now, now, f"label {budget.label} spent {share} of its budget",
                      f"{total:.2f} {currency} of {budget.amount:g} {currency} over "
                      f"{len(jobs)} job(s): {shown}{action}")
        await self._send(ALERTS.name, alert.fingerprint.encode(), alert.SerializeToString(),
                         budget.label)

    async def placement(self, job_id: str, ranks: dict, ended: bool) -> None:
        import socket
        import time

        from mlpe.common.topics import PLACEMENT
        from mlpe.v1 import training_pb2

        node = socket.gethostname()  # the launcher runs here; agents name nodes so too
        message = training_pb2.JobPlacement(job_id=job_id, node_id=node,
                                            time_ns=time.time_ns(), ended=ended)
        for rank, p in sorted(ranks.items(), key=lambda kv: int(kv[0])):
            message.ranks.add(rank=int(rank), local_rank=int(rank), pid=p["pid"])
        await self._send(PLACEMENT.name, f"{node}/{job_id}".encode(),
                         message.SerializeToString(), job_id)

    async def close(self) -> None:
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()


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
    if not 0 <= args.standby <= 16:
        raise SettingsError(f"--standby must be between 0 and 16, got {args.standby}")
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
    try:
        table = prices.load(settings.prices_path)
    except prices.PriceError as err:
        log.error("control not started: the price table is broken", error=str(err))
        return 2
    try:
        label_budgets = budgets.load(settings.budgets_path) if settings.budgets_path else []
    except budgets.BudgetError as err:
        log.error("control not started: the budgets file is broken", error=str(err))
        return 2
    has_gpu, found = costs.detect_gpu()
    pricer = costs.Pricer(table, settings.control_gpu_type or found, settings.pricing,
                          has_gpu)
    log.info("job costs", gpu_type=pricer.gpu_type or "unknown", pricing=pricer.pricing,
             currency=table.currency, prices=str(settings.prices_path))
    store = JobStore(client, JobKeys(settings.control_namespace))
    kafka = KafkaEvents(settings, log)
    supervisor = Supervisor(store, args.jobs_dir or settings.state_dir / "jobs", args.slots,
                            alerts=kafka.alert, placements=kafka.placement,
                            standbys=args.standby, pricer=pricer, publish_cost=kafka.cost,
                            budget_alerts=kafka.budget_alert, label_budgets=label_budgets,
                            label_alerts=kafka.label_budget_alert)
    listen = args.listen or f"0.0.0.0:{settings.control_port}"
    server, port = await serve(store, supervisor, token, listen, credentials,
                               settings.control_script_roots)
    log.info("control serving", address=listen, port=port, slots=args.slots,
             tls=credentials is not None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await supervise(supervisor, stop)
    await server.stop(grace=5)
    supervisor.detach()
    await kafka.close()
    await client.aclose()
    log.info("control stopped; running jobs keep running and are re-attached on restart")
    return 0
