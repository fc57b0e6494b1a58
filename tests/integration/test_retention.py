"""Storage that lasts: the stack's buckets per resolution with their retention, made again
idempotently; the downsampling task's Flux turns 10 s windows into 1 min ones."""

from __future__ import annotations

import time

import pytest
from influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS

from mlpe.common.settings import load
from mlpe.stack import retention
from mlpe.stack.influxdb import http_json

# One pytest worker for both: the first points the stack's one task at a bucket family of
# its own for a moment, and the second checks the task's Flux.
pytestmark = pytest.mark.xdist_group("retention")


def buckets(e) -> dict[str, int]:
    code, body = http_json("GET", f"{e.influx_url}/api/v2/buckets?limit=100",
                           token=e.influx_token)
    assert code == 200, body
    return {b["name"]: sum(r.get("everySeconds", 0) for r in b["retentionRules"])
            for b in body["buckets"]}


def test_stack_makes_each_bucket_with_its_retention_idempotently(stack_endpoints, unique):
    e = stack_endpoints
    settings = load({"MLPE_INFLUX_BUCKET": e.influx_bucket})
    have = buckets(e)  # the session's `stack up` made them
    assert {name: have.get(name) for name in settings.influx_buckets} == \
        settings.influx_buckets == {e.influx_bucket: 365 * 86_400,
                                    e.bucket_of("1s"): 86_400,
                                    e.bucket_of("10s"): 30 * 86_400,
                                    e.bucket_of("1m"): 365 * 86_400}
    # Other retentions for a bucket family of its own: created, then changed in place.
    other = {"MLPE_INFLUX_BUCKET": f"r{unique}", "MLPE_INFLUX_ORG": e.influx_org}
    try:
        first = load({**other, "MLPE_INFLUX_RETENTION_1S": "2h"})
        retention.ensure(first, http_json, e.influx_url, e.influx_token)
        retention.ensure(first, http_json, e.influx_url, e.influx_token)  # again: no change
        assert {n: buckets(e).get(n) for n in first.influx_buckets} == first.influx_buckets
        second = load({**other, "MLPE_INFLUX_RETENTION_1S": "3h",
                       "MLPE_INFLUX_RETENTION_1M": "0"})
        retention.ensure(second, http_json, e.influx_url, e.influx_token)
        assert {n: buckets(e).get(n) for n in second.influx_buckets} == \
            {f"r{unique}": 0, f"r{unique}-1s": 3 * 3600, f"r{unique}-10s": 30 * 86_400,
             f"r{unique}-1m": 0}
    finally:
        _, body = http_json("GET", f"{e.influx_url}/api/v2/buckets?limit=100",
                            token=e.influx_token)
        for b in body["buckets"]:
            if b["name"].startswith(f"r{unique}"):
                http_json("DELETE", f"{e.influx_url}/api/v2/buckets/{b['id']}",
                          token=e.influx_token)
        # the task now reads r<unique>-10s: give it back to the session's buckets
        retention.ensure(load({"MLPE_INFLUX_BUCKET": e.influx_bucket}), http_json,
                         e.influx_url, e.influx_token)


def test_the_task_is_made_off_by_default_and_its_flux_makes_1_min_windows(stack_endpoints,
                                                                          unique):
    e = stack_endpoints
    settings = load({"MLPE_INFLUX_BUCKET": e.influx_bucket})
    code, body = http_json("GET", f"{e.influx_url}/api/v2/tasks?name={retention.TASK_NAME}",
                           token=e.influx_token)
    assert code == 200, body
    [task] = body["tasks"]
    assert task["status"] == "inactive" and task["flux"] == retention.task_flux(settings)
    # Two minutes of 10 s windows of one GPU, an hour ago (the task's own runs only look
    # at the last minutes), then the task's Flux run on demand over those minutes.
    minute = (time.time_ns() // 60_000_000_000 - 60) * 60_000_000_000
    node = f"ds{unique}"
    lines = [f"gpu,node={node},window=10s,gpu=0 util_min={i}.0,util_mean={10 + i}.0,"
             f"util_max={20 + i}.0,util_p95={15 + i}.0,util_last={30 + i}.0,samples=1000i "
             f"{minute + i * 10_000_000_000}" for i in range(12)]
    with InfluxDBClient(url=e.influx_url, token=e.influx_token, org=e.influx_org) as client:
        client.write_api(write_options=SYNCHRONOUS).write(e.bucket_of("10s"), record=lines)
        iso = lambda ns: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns // 10**9))  # noqa: E731
        client.query_api().query(retention.downsample_flux(
            settings, iso(minute), iso(minute + 120 * 10**9)))
        tables = client.query_api().query(f'''
            from(bucket: "{e.bucket_of("1m")}") |> range(start: -2h)
              |> filter(fn: (r) => r._measurement == "gpu" and r.node == "{node}")''')
    got = {(int(r.get_time().timestamp() * 1e9) - minute, r["window"], r.get_field()):
           r.get_value() for t in tables for r in t.records}
    assert got == {
        **{(0, "1m", f): v for f, v in (("util_min", 0.0), ("util_mean", 12.5),
                                        ("util_max", 25.0), ("util_p95", 20.0),
                                        ("util_last", 35.0), ("samples", 6000))},
        **{(60 * 10**9, "1m", f): v for f, v in (("util_min", 6.0), ("util_mean", 18.5),
                                                 ("util_max", 31.0), ("util_p95", 26.0),
                                                 ("util_last", 41.0), ("samples", 6000))}}
