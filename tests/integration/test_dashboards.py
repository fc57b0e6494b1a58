"""Every Grafana panel, variable and annotation query in deploy/grafana/dashboards, run the
way Grafana runs it against the real InfluxDB after the simulator has filled it through the
stream, returns the series it should: no panel silently empty.

Grafana interpolates Flux text before sending it: `${var}` / `${var:regex}` with the chosen
values and `v.timeRangeStart` / `v.timeRangeStop` / `v.windowPeriod` with the time range
and the display interval (its macros are textual); `render` does the same."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from influxdb_client import InfluxDBClient

from mlpe.agent.agent import Agent, inventory_records
from mlpe.agent.scenario import parse
from mlpe.agent.shipper import Shipper
from mlpe.agent.sources.host import HostMetrics
from mlpe.agent.sources.sim import SimulatedGpus
from mlpe.agent.sources.train_sim import SimulatedTraining
from mlpe.agent.spool import Spool
from mlpe.common import prices
from mlpe.common.kafka import wait_stream_ready
from mlpe.common.settings import load as load_settings
from mlpe.control.costs import Ledger
from tests.helpers import DEPLOY, forget_topics, mlpe_env, start_mlpe

from .test_stream import stop

DASHBOARDS = DEPLOY / "grafana" / "dashboards"
# On one pytest worker with test_stream.py (the "stream-b" group, see there); the fixture
# fills InfluxDB once for every panel's test.
pytestmark = pytest.mark.xdist_group("stream-b")
GPUS, SECONDS = 4, 24
THERMAL, STRAGGLER, XID = ("00", "1"), ("01", "2"), ("01", "3")  # (node suffix, gpu)
SCENARIO = f"""
seed: 7
nodes: 2
gpus_per_node: {GPUS}
training: {{step_time_s: 0.5, warmup_s: 2, job_id: JOB}}
faults:
  - {{kind: thermal_throttle, node: 0, gpu: 1, at_s: 4, for_s: 10, magnitude: 0.4}}
  - {{kind: straggler, node: 1, gpu: 2, at_s: 4, for_s: 16, magnitude: 0.3}}
  - {{kind: xid, node: 1, gpu: 3, at_s: 6, code: 79}}
"""


@dataclass
class Filled:
    influx_url: str
    token: str
    org: str
    bucket: str
    prefix: str
    job: str
    start: datetime
    stop: datetime

    def node(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def query(self, flux: str) -> list[dict]:
        with InfluxDBClient(url=self.influx_url, token=self.token, org=self.org,
                            timeout=60_000) as client:
            tables = client.query_api().query(flux)
        return [{**r.values, "_table": i} for i, t in enumerate(tables) for r in t.records]


def render(flux: str, values: dict[str, str | list[str]], start: datetime, stop: datetime,
           period_ms: int = 2000) -> str:
    """The query text Grafana sends for these variable values and this time range."""
    def substitute(m: re.Match) -> str:
        name, fmt = m.group(1), m.group(2)
        value = values[name]
        if fmt == "regex":
            return value if value == ".*" else (
                "(" + "|".join(re.escape(v) for v in value) + ")" if isinstance(value, list)
                else re.escape(value))
        assert fmt is None, f"format :{fmt} is not one Grafana's Flux panels here use"
        assert isinstance(value, str), f"${{{name}}} is multi-valued; use ${{{name}:regex}}"
        return value

    flux = re.sub(r"\$\{(\w+)(?::(\w+))?\}", substitute, flux)
    assert "${" not in flux, f"an unknown variable form is left in: {flux}"
    iso = "%Y-%m-%dT%H:%M:%S.%fZ"
    return (flux.replace("v.timeRangeStart", start.strftime(iso))
                .replace("v.timeRangeStop", stop.strftime(iso))
                .replace("v.windowPeriod", f"{period_ms}ms"))


def numbers(rows: list[dict], column: str = "_value") -> list[float]:
    return [float(r[column]) for r in rows if r.get(column) is not None]


def series(rows: list[dict], *labels: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(label) for label in labels), []).append(r)
    return out


KERNEL_RANKS, KERNEL_SUMMARIES = 2, 3


def publish_kernel_summaries(bootstrap: str, spool, job: str) -> None:
    """What a training rank with MLPE_KERNEL_PROFILE=1 sends: mlpe.kernels' ops run and
    timed for real (on the CPU, their reference implementations), summarised by the SDK's
    kernel_summary and published through its Publisher."""
    import torch

    from mlpe.kernels import profile
    from mlpe.kernels.rmsnorm import rmsnorm
    from mlpe.kernels.swiglu import swiglu
    from mlpe.sdk.publish import Publisher
    from mlpe.sdk.run import kernel_summary

    x, w = torch.randn(256, 512), torch.ones(512)
    for rank in range(KERNEL_RANKS):
        publisher = Publisher(bootstrap, spool / str(rank))
        try:
            for i in range(KERNEL_SUMMARIES):
                with profile.profiling():
                    for _ in range(10):
                        swiglu(rmsnorm(x, w), x)
                publisher.kernels(kernel_summary(job, rank, 10 * i + 1, 10 * i + 10,
                                                 torch.device("cpu")))
        finally:
            publisher.close()


COST_PRICE = 3600.0  # per GPU-hour: one currency unit per GPU-second, easy to check


def publish_job_costs(bootstrap: str, job: str) -> Ledger:
    """What `mlpe control` sends for a 2-GPU job that ran 4 s, lost 2 s to a crash and
    was paused 3 s: its ledger's JobCost events, one per change, on mlpe.events.cost."""
    from aiokafka import AIOKafkaProducer

    from mlpe.common.topics import COST_EVENTS
    from mlpe.control.costs import FAILURE, PAUSED, USEFUL

    ledger = Ledger(2, "h100-sxm", "on_demand", COST_PRICE, "USD")
    now = time.time_ns() - 10 * 10**9
    events = []
    for phase, seconds in ((USEFUL, 3), (FAILURE, 2), (USEFUL, 1), (PAUSED, 3), ("", 0)):
        ledger.switch(phase, now)
        events.append(ledger.proto(job, "dash", now, budget=50.0))
        now += seconds * 10**9

    async def send():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for cost in events:
                await producer.send_and_wait(COST_EVENTS.name, cost.SerializeToString(),
                                             key=job.encode())
        finally:
            await producer.stop()
    asyncio.run(send())
    return ledger


# Session scope: its pytest worker may run other modules between this one's tests, and a
# module fixture would then fill InfluxDB again.
@pytest.fixture(scope="session")
def filled(stack_endpoints, tmp_path_factory) -> Filled:
    """2 simulated nodes x 4 GPUs with a thermal throttle, a straggler and an Xid, their
    training job's step events and node 00's host metrics: agent → Kafka → `mlpe stream`
    → InfluxDB, waited for until every measurement the dashboards read is there."""
    e = stack_endpoints
    unique = uuid.uuid4().hex[:8]
    prefix, job = f"g{unique}", f"g{unique}-job"
    tmp = tmp_path_factory.mktemp("dashboards")
    env = mlpe_env(MLPE_STREAM_APP_ID=f"test-dash-{unique}", MLPE_STREAM_START="latest",
                   MLPE_STATE_DIR=str(tmp / "state"), MLPE_KAFKA_BOOTSTRAP=e.kafka_bootstrap,
                   MLPE_INFLUX_URL=e.influx_url, MLPE_INFLUX_TOKEN=e.influx_token)
    stream = start_mlpe("stream", env=env, log=tmp / "stream.log")
    try:
        wait_stream_ready(e.kafka_bootstrap, env["MLPE_STREAM_APP_ID"], 1, [stream])
        scenario = parse(SCENARIO.replace("JOB", job))
        start = datetime.now(UTC)
        sim = SimulatedGpus(scenario, 100, node_prefix=f"{prefix}-")
        training = SimulatedTraining(scenario, 100, node_prefix=f"{prefix}-")
        nodes = sim.node_inventories()
        agent = Agent([(sim, 100), (HostMetrics(f"{prefix}-00"), 10)],
                      Shipper(e.kafka_bootstrap, Spool(tmp / "spool")), hz=100,
                      training=training, job_id=training.job_id,
                      inventory=inventory_records(list(nodes), nodes.__getitem__))
        asyncio.run(agent.run(duration_s=SECONDS))
        publish_kernel_summaries(e.kafka_bootstrap, tmp / "kernel-spool", job)
        publish_job_costs(e.kafka_bootstrap, job)
        data = Filled(e.influx_url, e.influx_token, e.influx_org, e.influx_bucket, prefix,
                      job, start, start)
        # Ready when the last seconds of every kind are written (the stream closes a window
        # after its lateness allowance) and the Xid alert is stored.
        wanted = {"gpu": GPUS * 2, "host": 1, "train": 8, "alert": 1, "kernel": KERNEL_RANKS,
                  "cost": 1, "gpu_cost": GPUS * 2}
        deadline = time.monotonic() + 90
        while True:
            assert stream.poll() is None, (tmp / "stream.log").read_text()[-3000:]
            data.stop = datetime.now(UTC)
            since = render("v.timeRangeStart", {}, start, data.stop)
            rows = data.query(f'''
                union(tables: [
                    from(bucket: "{e.bucket_of("1s")}") |> range(start: {since}),
                    from(bucket: "{e.bucket_of("10s")}") |> range(start: {since})
                      |> filter(fn: (r) => r._measurement == "gpu_cost"),
                    from(bucket: "{e.influx_bucket}") |> range(start: {since})])
                  |> filter(fn: (r) => (r.node =~ /^{prefix}-/ or r.job == "{job}") and
                                       (r._field == "samples" or r._field == "summary" or
                                        r._field == "calls" or r._field == "total" or
                                        r._field == "cost"))
                  |> group(columns: ["_measurement", "node", "gpu", "rank"])
                  |> last()''')
            have = {m: len([r for r in rows if r["_measurement"] == m]) for m in wanted}
            newest = max((r["_time"] for r in rows if r["_measurement"] == "gpu"),
                         default=start)
            if all(have[m] >= n for m, n in wanted.items()) and \
                    (newest - start).total_seconds() >= SECONDS - 3:
                return data
            assert time.monotonic() < deadline, f"InfluxDB holds only {have}"
            time.sleep(1)
    finally:
        stop(stream)
        forget_topics(e.kafka_bootstrap, f"test-dash-{unique}")


def dashboard(name: str) -> dict:
    return json.loads((DASHBOARDS / f"{name}.json").read_text())


def resolve_variables(board: dict, data: Filled, chosen: dict[str, str]) -> dict:
    """Each variable's value as Grafana would offer it: constants and custom lists by their
    default, query variables by running their query (which must offer `chosen`)."""
    values: dict = {}
    for var in board["templating"]["list"]:
        name = var["name"]
        if var["type"] == "constant":
            values[name] = var["query"]
        elif var["type"] == "custom":
            values[name] = var["current"]["value"]
        else:
            assert var["type"] == "query", f"variable {name}: unexpected type {var['type']}"
            offered = {r["_value"] for r in data.query(
                render(var["query"], values, data.start, data.stop))}
            if name in chosen:
                assert chosen[name] in offered, f"${name} does not offer {chosen[name]}"
                values[name] = chosen[name]
            else:  # a multi-value variable with "All": what Grafana sends for All
                assert var.get("includeAll") and var.get("allValue"), name
                values[name] = var["allValue"]
                values[f"_offered_{name}"] = offered
    return values


def run_panels(board: dict, data: Filled, values: dict) -> dict[str, list[dict]]:
    results = {}
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "mlpe-influxdb", panel["title"]
        [target] = panel["targets"]
        rows = data.query(render(target["query"], values, data.start, data.stop))
        assert rows, f"panel {panel['title']!r} returned no data"
        results[panel["title"]] = rows
    [annotation] = [a for a in board["annotations"]["list"] if a["name"] == "Alerts"]
    results["annotation"] = data.query(render(annotation["target"]["query"], values,
                                              data.start, data.stop))
    return results


def check_all_panels_checked(results: dict, checks: dict) -> None:
    assert set(results) == set(checks), (
        "every panel needs an expectation here; unchecked: "
        f"{sorted(set(results) - set(checks))}, gone: {sorted(set(checks) - set(results))}")
    for title, check in checks.items():
        try:
            check(results[title])
        except AssertionError as err:
            raise AssertionError(f"panel {title!r}: {err}") from err


def test_fleet_overview(filled):
    board = dashboard("fleet")
    results = run_panels(board, filled, resolve_variables(board, filled, {}))
    ours = {filled.node("00"), filled.node("01")}

    def per_node(rows, labels=("node",)):
        assert ours <= {k[0] for k in series(rows, *labels)}, "a simulated node is missing"

    def throttled(rows):
        counts = series(rows, "node")
        assert max(numbers(counts[(filled.node("00"),)])) >= 1  # the thermal GPU
        assert max(numbers(counts[(filled.node("01"),)])) == 0

    def latest(rows):
        mine = [r for r in rows if r["node"] in ours]
        assert len(mine) == 2 * GPUS
        assert all(math.isfinite(r[c]) for r in mine for c in
                   ("util_mean", "power_mean", "temp_max", "sm_clock_mean", "mem_used_max"))
        temps = numbers(rows, "temp_max")
        assert temps == sorted(temps, reverse=True)

    def alerts(rows, text="summary"):
        texts = {r[text] for r in rows}
        assert any(f"Xid 79 on GPU 3 on {filled.node('01')}" in t for t in texts), texts
        assert any(f"GPU 1 on {filled.node('00')} throttled: hw thermal" in t for t in texts)

    price = prices.load(load_settings({}).prices_path).per_gpu_hour("h100-sxm")

    def fleet_cost(rows):
        by_field = series(rows, "_field")
        assert set(by_field) == {("cost",), ("idle_cost",)}
        assert sum(numbers(by_field[("cost",)])) >= 2 * GPUS * 10 * price / 3600  # a window

    def cost_by_node(rows):
        mine = {r["node"]: r for r in rows if r["node"] in ours}
        assert set(mine) == ours
        for r in mine.values():
            assert (r["gpu_type"], r["currency"]) == ("h100-sxm", "USD")
            assert r["gpu_hours"] >= GPUS * 10 / 3600 and \
                0 <= r["idle_gpu_hours"] <= r["gpu_hours"]
            assert r["cost"] == pytest.approx(r["gpu_hours"] * price)
            assert r["idle_cost"] == pytest.approx(r["idle_gpu_hours"] * price)
        costs = numbers(rows, "cost")
        assert costs == sorted(costs, reverse=True)

    check_all_panels_checked(results, {
        "Fleet GPU cost per display interval: every GPU and the idle ones": fleet_cost,
        "GPU cost by node over the range: total, idle, GPU-hours": cost_by_node,
        "GPUs reporting": lambda rows: numbers(rows)[0] >= 2 * GPUS or pytest.fail(rows),
        "Nodes reporting": lambda rows: numbers(rows)[0] >= 2 or pytest.fail(rows),
        "Alerts firing": lambda rows: numbers(rows)[0] >= 1 or pytest.fail(rows),  # the Xid
        "GPU samples ingested / s":
            lambda rows: numbers(rows)[0] >= 100 * GPUS or pytest.fail(rows),
        "GPU utilization by node (mean of its GPUs)": per_node,
        "GPU power by node (sum of its GPUs)": per_node,
        "Hottest GPU by node": per_node,
        "GPUs throttled (thermal, slowdown, power brake) by node": throttled,
        "Host CPU utilization by node":
            lambda rows: filled.node("00") in {r["node"] for r in rows} or pytest.fail(),
        "GPU samples ingested / s (over time)":
            lambda rows: max(numbers(rows)) >= 200 * GPUS or pytest.fail(rows),
        "GPUs, latest window, hottest first": latest,
        "Alerts (newest first)": alerts,
        "annotation": lambda rows: alerts(rows, "text"),
    })


def test_node_drill_down(filled):
    board = dashboard("node")
    node = filled.node("00")
    values = resolve_variables(board, filled, {"node": node})
    gpus = {str(g) for g in range(GPUS)}
    assert values["_offered_gpu"] == gpus
    results = run_panels(board, filled, values)

    def each_gpu(rows):
        assert {k[0] for k in series(rows, "gpu")} == gpus
        assert {r["node"] for r in rows if "node" in r} <= {node}

    def throttle(rows):
        by_gpu = series(rows, "gpu")
        assert int(max(numbers(by_gpu[("1",)]))) & 64, "GPU 1's hw-thermal bit"
        assert not any(int(v) & 64 for v in numbers(by_gpu[("0",)]))

    def samples(rows):
        each_gpu(rows)
        assert max(numbers(rows)) == 100 and min(numbers(rows)) > 0

    def alerts(rows, text="summary"):
        if text == "summary":
            assert {r.get("node") for r in rows} == {node}
        assert any(f"GPU 1 on {node} throttled: hw thermal" in r[text] for r in rows)
        assert not any("Xid" in r[text] for r in rows)  # that was node 01

    checks = {p["title"]: each_gpu for p in board["panels"] if p["type"] == "timeseries"}
    checks.update({
        "Clock-throttle reasons (NVML bitmask, max)": throttle,
        "Samples per 1 s window (ingest completeness)": samples,
        "Host CPU utilization": lambda rows: min(numbers(rows)) >= 0 or pytest.fail(),
        "Host memory used": lambda rows: min(numbers(rows)) > 0 or pytest.fail(),
        "Alerts on this node": alerts,
        "annotation": lambda rows: alerts(rows, "text"),
    })
    check_all_panels_checked(results, checks)


def test_job_view(filled):
    board = dashboard("job")
    results = run_panels(board, filled, resolve_variables(board, filled, {"job": filled.job}))
    ranks = {str(r) for r in range(2 * GPUS)}

    def one_series(rows):
        assert len(series(rows, "_table")) == 1
        assert all(math.isfinite(v) and v > 0 for v in numbers(rows))

    def by_rank(rows):
        assert {k[0] for k in series(rows, "rank")} == ranks

    def stragglers(rows):
        assert len(rows) == 2 * GPUS
        slowest = {(r["node"], r["gpu"]) for r in rows[:2]}
        assert slowest == {(filled.node(n), g) for n, g in (THERMAL, STRAGGLER)}, rows[:3]
        assert all(r["vs_job_median_pct"] < -5 for r in rows[:2])
        assert all(abs(r["vs_job_median_pct"]) < 5 for r in rows[2:])

    ops = {("rmsnorm", "forward"), ("swiglu", "forward")}

    def kernel_calls(rows):
        by_op = series(rows, "op", "direction")
        assert set(by_op) == ops
        # 10 calls per op per summary, from each rank, all in the range
        assert all(sum(numbers(r)) == 10 * KERNEL_RANKS * KERNEL_SUMMARIES
                   for r in by_op.values()), {k: numbers(v) for k, v in by_op.items()}

    def kernel_times(rows):
        by_op = series(rows, "op", "direction", "_field")
        assert set(by_op) == {(*op, f) for op in ops for f in ("p50_ms", "p99_ms")}
        for op, direction in ops:
            p50s, p99s = (numbers(by_op[(op, direction, f)]) for f in ("p50_ms", "p99_ms"))
            assert all(0 < v < 1000 for v in p50s + p99s) and max(p50s) <= max(p99s)

    def kernel_bandwidth(rows):
        assert set(series(rows, "op", "direction")) == ops  # both ops' bytes are known
        assert all(math.isfinite(v) and v > 0 for v in numbers(rows))

    def cost_split(rows):  # the last event: useful 4 s, failure 2 s, paused 3 s of 2 GPUs
        last = {k[0]: numbers(v)[-1] for k, v in series(rows, "_field").items()}
        assert last == {"useful": 8.0, "failure": 4.0, "paused": 6.0}, last
        assert {r["currency"] for r in rows} == {"USD"}

    def cost_stat(rows):
        assert {r["_field"]: r["_value"] for r in rows} == {
            "total": 18.0, "gpu_hours": pytest.approx(18 / 3600), "budget": 50.0}

    def alerts(rows, text="summary"):
        texts = [r[text] for r in rows]
        assert any("Xid 79" in t for t in texts) and any("hw thermal" in t for t in texts)
        assert all(filled.prefix in t for t in texts), "an alert from outside the job"

    check_all_panels_checked(results, {
        "Loss (mean over ranks)": one_series,
        "Tokens / s (sum over ranks)": one_series,
        "Step time by rank": by_rank,
        "Step-time distribution (per rank, per 1 s window)":
            lambda rows: len(rows) >= 2 * GPUS * (SECONDS - 4) or pytest.fail(len(rows)),
        "Gradient norm (max over ranks)": one_series,
        "Memory allocated by rank (max)": by_rank,
        "Utilization of the job's GPUs":
            lambda rows: len(series(rows, "node", "gpu")) == 2 * GPUS or pytest.fail(),
        "Stragglers: the job's GPUs by SM clock against the job's median, last 5 min":
            stragglers,
        "Alerts on the job and its nodes": alerts,
        "annotation": lambda rows: alerts(rows, "text"),
        "Kernel calls by op (sum over ranks)": kernel_calls,
        "Kernel time per call by op: p50 and p99 (ms, slowest rank)": kernel_times,
        "Kernel bandwidth by op (GB/s, mean over ranks)": kernel_bandwidth,
        "Cost so far: useful, failures, paused (stacked, job's currency)": cost_split,
        "Cost and budget": cost_stat,
    })


def test_render_substitutes_like_grafana():
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    text = render('r.node == "${node}" and r.gpu =~ /^${gpu:regex}$/ |> range(start: '
                  'v.timeRangeStart, stop: v.timeRangeStop) every: v.windowPeriod',
                  {"node": "a.b", "gpu": ["1", "2"]}, start, start, 500)
    assert text == ('r.node == "a.b" and r.gpu =~ /^(1|2)$/ |> range(start: '
                    '2026-01-02T03:04:05.000000Z, stop: 2026-01-02T03:04:05.000000Z) '
                    'every: 500ms')
    assert "/^.*$/" in render("/^${gpu:regex}$/", {"gpu": ".*"}, start, start)
    with pytest.raises(KeyError):
        render("${nope}", {}, start, start)


@pytest.mark.parametrize(("ago", "span", "chosen", "wanted"), [
    (timedelta(0), timedelta(minutes=30), "auto", "1s"),
    (timedelta(days=2), timedelta(minutes=30), "auto", "10s"),   # 1 s is kept a day
    (timedelta(0), timedelta(hours=6), "auto", "10s"),
    (timedelta(days=40), timedelta(hours=1), "auto", "1m"),     # 10 s is kept 30 days
    (timedelta(0), timedelta(days=30), "auto", "1m"),
    (timedelta(0), timedelta(days=30), "10s", "10s"),           # chosen by hand
])
def test_the_resolution_follows_the_time_range(stack_endpoints, ago, span, chosen, wanted):
    e = stack_endpoints
    [panel] = [p for p in dashboard("job")["panels"] if p["title"] == "Step time by rank"]
    query = panel["targets"][0]["query"]
    prelude = query[:query.index("from(bucket: bucket)")]
    stop = datetime.now(UTC) - ago
    flux = render('import "array"\n' + prelude + 'array.from(rows: [{res: res, b: bucket}])',
                  {"resolution": chosen, "bucket": e.influx_bucket}, stop - span, stop)
    with e.influx() as client:
        [row] = [r.values for t in client.query_api().query(flux) for r in t.records]
    assert (row["res"], row["b"]) == (wanted, e.bucket_of(wanted))
