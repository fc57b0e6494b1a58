"""InfluxDB is real: write points with influxdb-client, read them back with Flux."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException


def test_write_then_flux_query(stack_endpoints, unique):
    e = stack_endpoints
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    with e.influx() as client:
        points = [
            Point("gpu").tag("node", f"n-{unique}").tag("gpu", str(i % 2))
            .field("util_mean", 50.0 + i).time(start + timedelta(seconds=i), WritePrecision.S)
            for i in range(10)
        ]
        client.write_api(write_options=SYNCHRONOUS).write(bucket=e.influx_bucket, record=points)
        # Rewriting the same series and timestamp overwrites (idempotent replay).
        client.write_api(write_options=SYNCHRONOUS).write(bucket=e.influx_bucket, record=points)

        tables = client.query_api().query(f'''
            from(bucket: "{e.influx_bucket}")
              |> range(start: -1h)
              |> filter(fn: (r) => r._measurement == "gpu" and r.node == "n-{unique}")
              |> group(columns: ["gpu"])
              |> sum()
        ''')
    sums = {t.records[0]["gpu"]: t.records[0].get_value() for t in tables}
    assert sums == {"0": sum(50.0 + i for i in range(0, 10, 2)),
                    "1": sum(50.0 + i for i in range(1, 10, 2))}


def test_bad_token_is_refused(stack_endpoints):
    e = stack_endpoints
    client = InfluxDBClient(url=e.influx_url, token="not-the-token", org=e.influx_org)
    try:
        with pytest.raises(ApiException) as err:
            client.query_api().query(f'from(bucket: "{e.influx_bucket}") |> range(start: -1m)')
    finally:
        client.close()
    assert err.value.status == 401


async def test_stream_writer_drops_only_the_malformed_line(stack_endpoints, unique, monkeypatch):
    """One bad line (NaN is not line protocol) must not block the lines around it."""
    import time

    from mlpe.common import settings as settings_module
    from mlpe.stream.influx import InfluxWriter

    e = stack_endpoints
    for name, value in (("TOKEN", e.influx_token), ("URL", e.influx_url),
                        ("ORG", e.influx_org), ("BUCKET", e.influx_bucket)):
        monkeypatch.setenv(f"MLPE_INFLUX_{name}", value)
    writer = InfluxWriter(settings_module.load())
    now = time.time_ns()
    lines = [f"probe,run={unique} v={i}.0 {now + i}" for i in range(7)]
    lines[3] = f"probe,run={unique} v=nan {now + 3}"
    await writer.write(lines)
    await writer.close()
    assert writer.rejected == 1
    with e.influx() as client:
        tables = client.query_api().query(f'''
            from(bucket: "{e.influx_bucket}") |> range(start: -10m)
              |> filter(fn: (r) => r._measurement == "probe" and r.run == "{unique}")''')
    assert sorted(r.get_value() for t in tables for r in t.records) == [0, 1, 2, 4, 5, 6]


async def test_points_beyond_retention_are_dropped_not_retried(stack_endpoints, unique):
    """InfluxDB answers 422 for points older than a bucket's retention (a replay of old
    data): the writer must return, keep the rest, and count it (it used to retry for
    ever, and every consumer behind the write stalled)."""
    import time

    from mlpe.common.settings import load
    from mlpe.stream.influx import InfluxWriter

    e = stack_endpoints
    writer = InfluxWriter(load({"MLPE_INFLUX_URL": e.influx_url, "MLPE_INFLUX_TOKEN":
                                e.influx_token, "MLPE_INFLUX_ORG": e.influx_org,
                                "MLPE_INFLUX_BUCKET": e.influx_bucket}))
    now_ns = time.time_ns()
    old_ns = now_ns - 3 * 86_400 * 10**9  # the 1 s bucket keeps a day
    try:
        await writer.write([f"gpu,node=old-{unique},window=1s,gpu=0 util_mean=1.0 {old_ns}",
                            f"gpu,node=new-{unique},window=1s,gpu=0 util_mean=2.0 {now_ns}"])
    finally:
        await writer.close()
    assert writer.beyond_retention == 1 and writer.failures == 0
    with e.influx() as client:
        tables = client.query_api().query(f'''
            from(bucket: "{e.bucket_of('1s')}") |> range(start: -5m)
              |> filter(fn: (r) => r.node == "new-{unique}")''')
    assert [r.get_value() for t in tables for r in t.records] == [2.0]
