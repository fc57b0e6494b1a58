"""Storage that lasts: the stack's buckets per resolution with their retention, made again
idempotently; the downsampling task of an earlier version deleted."""

from __future__ import annotations

import pytest

from mlpe.common.settings import load
from mlpe.stack import retention
from mlpe.stack.influxdb import http_json

# One pytest worker for both: each runs `ensure` on the stack's server.
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


def test_the_old_downsampling_task_is_deleted(stack_endpoints):
    """An InfluxDB set up by an earlier version has a task writing the 1 min bucket;
    the stream writes it now (rollup.py), so `ensure` deletes the task."""
    e = stack_endpoints
    code, body = http_json("GET", f"{e.influx_url}/api/v2/orgs?org={e.influx_org}",
                           token=e.influx_token)
    assert code == 200, body
    org_id = body["orgs"][0]["id"]
    flux = (f'option task = {{name: "{retention.OLD_TASK_NAME}", every: 1h}}\n'
            f'from(bucket: "{e.bucket_of("10s")}") |> range(start: -1m) |> yield()')
    code, body = http_json("POST", f"{e.influx_url}/api/v2/tasks",
                           {"orgID": org_id, "flux": flux, "status": "inactive"},
                           token=e.influx_token)
    assert code == 201, body

    def tasks() -> list:
        code, body = http_json("GET", f"{e.influx_url}/api/v2/tasks?orgID={org_id}"
                               f"&name={retention.OLD_TASK_NAME}", token=e.influx_token)
        assert code == 200, body
        return body["tasks"]

    assert len(tasks()) == 1
    retention.ensure(load({"MLPE_INFLUX_BUCKET": e.influx_bucket}), http_json,
                     e.influx_url, e.influx_token)
    assert tasks() == []
