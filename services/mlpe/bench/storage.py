"""Bytes on disk per stored value on this machine's InfluxDB, and what a 1,000-GPU fleet
keeps per day at each resolution.

Writes windows shaped as the stream's 10 s `gpu` lines (one per GPU per window: 19
fields x min/mean/max/p95/last + samples = 96 values; the 1 s lines leave out p95: 77)
for `--gpus` GPUs over `--seconds` seconds, dated two weeks ago, into a scratch bucket;
waits until InfluxDB has snapshotted them from its write-ahead log into TSM files (it
does once a shard is cold for 10 min, storage-cache-snapshot-write-cold-duration),
measures its TSM files (bytes per value) and series index apart, and deletes the bucket.
Values are random walks at full float precision like the stream's means (the hard case
for InfluxDB's float compression); timestamps are regular.
"""

from __future__ import annotations

import time

import numpy as np

from mlpe.common.settings import Settings
from mlpe.stream.windows import SECOND_STATS, STATS

FIELDS = 19
VALUES_PER_LINE = FIELDS * len(STATS) + 1
GPUS_FLEET, DAY_S = 1_000, 86_400
RESOLUTION_S = {"1s": 1, "10s": 10, "1m": 60}
VALUES_PER_WINDOW = {"1s": FIELDS * len(SECOND_STATS) + 1, "10s": VALUES_PER_LINE,
                     "1m": VALUES_PER_LINE}


def register(sub) -> None:
    p = sub.add_parser("storage", help="InfluxDB bytes on disk per value; per 1,000 GPUs "
                       "per day and resolution", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=32, help="GPUs written (32)")
    p.add_argument("--seconds", type=int, default=1800, help="seconds of 1 s windows (1800)")
    p.add_argument("--wait-s", type=float, default=900.0,
                   help="longest wait for the TSM snapshot (900)")
    p.set_defaults(bench=run)


def _lines(gpus: int, seconds: int, start_ns: int, node: str):
    rng = np.random.default_rng(7)
    for gpu in range(gpus):
        walk = 50 + np.cumsum(rng.normal(0, 0.5, (seconds, FIELDS)), axis=0)
        for s in range(seconds):
            parts = ",".join(f"f{j}_{stat}={walk[s, j] + k * 0.37:.17g}"
                             for j in range(FIELDS) for k, stat in enumerate(STATS))
            yield (f"gpu,node={node}-{gpu // 8},window=1s,gpu={gpu % 8} {parts},"
                   f"samples=100i {start_ns + s * 10**9}")


def _disk(engine, bucket_id: str) -> dict[str, int]:
    """Bytes of the bucket's TSM files, its series index and its write-ahead log."""
    sizes = {"tsm": 0, "index": 0, "wal": 0}
    for kind, folder in (("data", engine / "data" / bucket_id),
                         ("wal", engine / "wal" / bucket_id)):
        for path in folder.rglob("*"):
            if path.is_file():
                key = "wal" if kind == "wal" else "tsm" if path.suffix == ".tsm" else "index"
                sizes[key] += path.stat().st_size
    return sizes


def run(args, settings: Settings) -> dict:
    from influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS

    from mlpe.common.tokens import influx_token
    from mlpe.stack.influxdb import InfluxDB, http_json

    url, token = settings.influx_url.rstrip("/"), influx_token(settings)
    if not token:
        raise RuntimeError("no InfluxDB token: run `mlpe stack up`")
    engine = InfluxDB(settings).data / "engine"
    if not engine.is_dir():
        raise RuntimeError(f"no InfluxDB engine folder at {engine}: this benchmark measures "
                           "the local stack's InfluxDB")
    code, body = http_json("GET", f"{url}/api/v2/orgs?org={settings.influx_org}", token=token)
    org_id = body["orgs"][0]["id"]
    name = f"mlpe-bench-storage-{time.time_ns()}"
    code, body = http_json("POST", f"{url}/api/v2/buckets",
                           {"orgID": org_id, "name": name, "retentionRules": []}, token=token)
    if code != 201:
        raise RuntimeError(f"creating the scratch bucket: HTTP {code} {body.get('message')}")
    bucket_id = body["id"]
    try:
        start_ns = (time.time_ns() // 10**9 - 14 * DAY_S) * 10**9
        lines = list(_lines(args.gpus, args.seconds, start_ns, "bench"))
        t0 = time.monotonic()
        with InfluxDBClient(url=url, token=token, org=settings.influx_org,
                            timeout=120_000) as client:
            api = client.write_api(write_options=SYNCHRONOUS)
            for at in range(0, len(lines), 2_000):
                api.write(name, record=lines[at:at + 2_000])
        write_s = time.monotonic() - t0
        deadline, waited = time.monotonic() + args.wait_s, time.monotonic()
        before: dict = {}
        while True:  # done: the WAL is empty (all in TSM) and compaction has settled
            sizes = _disk(engine, bucket_id)
            busy = any((engine / "data" / bucket_id).rglob("*.tmp"))
            if sizes["tsm"] and not sizes["wal"] and not busy and sizes == before:
                break
            before = sizes
            if time.monotonic() > deadline:
                raise RuntimeError(f"no TSM snapshot after {args.wait_s:g} s: {sizes}")
            time.sleep(30)
        waited = time.monotonic() - waited
    finally:
        http_json("DELETE", f"{url}/api/v2/buckets/{bucket_id}", token=token)
    values = len(lines) * VALUES_PER_LINE
    # The index grows with series (GPUs x fields), not with time: per value, the TSM bytes.
    per_value = sizes["tsm"] / values
    per_day = {res: GPUS_FLEET * DAY_S // s * VALUES_PER_WINDOW[res]
               for res, s in RESOLUTION_S.items()}
    retention_days = {res: settings.influx_retention_s[res] / DAY_S for res in RESOLUTION_S}
    gb_day = {res: per_day[res] * per_value / 1e9 for res in RESOLUTION_S}
    print(f"{values:,} values ({args.gpus} GPUs x {args.seconds} s x {VALUES_PER_LINE}) "
          f"written in {write_s:.1f} s; TSM after {waited:.0f} s: {sizes['tsm']:,} B, "
          f"index {sizes['index']:,} B -> {per_value:.2f} B per value")
    for res in RESOLUTION_S:
        print(f"  {res}: {per_day[res]:,} values per 1,000 GPUs per day = "
              f"{gb_day[res]:.1f} GB/day, x {retention_days[res]:g} d kept = "
              f"{gb_day[res] * retention_days[res]:.0f} GB")
    return {"values": values, "tsm_bytes": sizes["tsm"], "index_bytes": sizes["index"],
            "bytes_per_value": round(per_value, 3), "write_s": round(write_s, 1),
            "snapshot_wait_s": round(waited), "values_per_day_1000_gpus": per_day,
            "gb_per_day_1000_gpus": {k: round(v, 2) for k, v in gb_day.items()},
            "gb_kept_1000_gpus": {k: round(gb_day[k] * retention_days[k], 1)
                                  for k in RESOLUTION_S}}
