"""Storage that lasts: one InfluxDB bucket per resolution, each with its retention.

The stream writes 1 s, 10 s and 1 min windows (stream/rollup.py makes the minutes from
the 10 s windows); the writer routes each line to <bucket>-1s, <bucket>-10s or
<bucket>-1m by its window tag; alerts and kernel timings stay in the base bucket.
Retention comes from settings (MLPE_INFLUX_RETENTION_1S/10S/1M); `ensure` creates or
updates the buckets to match on every `mlpe stack up`, so it is idempotent and works on
a fresh server and on one set up before buckets per resolution existed.
"""

from __future__ import annotations

from collections.abc import Callable

from mlpe.common.settings import Settings
from mlpe.stack.component import StackError

# An earlier version made the minutes with this InfluxDB task; on a 2-core machine it
# took 10 s to 3 min of InfluxDB's CPU every minute. `ensure` deletes it: it would
# write over the stream's minutes.
OLD_TASK_NAME = "mlpe-downsample-1m"

Http = Callable[..., tuple[int, dict]]


def _retention_rules(seconds: int) -> list[dict]:
    return [{"type": "expire", "everySeconds": seconds}] if seconds else []


def _expect(code: int, body: dict, ok: tuple[int, ...], what: str) -> dict:
    if code not in ok:
        raise StackError(f"influxdb: {what} failed (HTTP {code}: {body.get('message')})")
    return body


def ensure(settings: Settings, http: Http, url: str, token: str) -> None:
    """Every bucket with its retention, created or updated; the old downsampling task
    deleted if a server still has it."""
    orgs = _expect(*http("GET", f"{url}/api/v2/orgs?org={settings.influx_org}", token=token),
                   (200,), f"finding org {settings.influx_org}")["orgs"]
    org_id = orgs[0]["id"]
    for name, seconds in settings.influx_buckets.items():
        found = _expect(*http("GET", f"{url}/api/v2/buckets?orgID={org_id}&name={name}",
                              token=token), (200, 404), f"finding bucket {name}")
        rules = _retention_rules(seconds)
        buckets = found.get("buckets") or []
        if not buckets:
            _expect(*http("POST", f"{url}/api/v2/buckets", {
                "orgID": org_id, "name": name, "retentionRules": rules}, token=token),
                (201,), f"creating bucket {name}")
        elif [(r.get("everySeconds"), r.get("type")) for r in buckets[0]["retentionRules"]
              if r.get("everySeconds")] != [(seconds, "expire")] * bool(seconds):
            _expect(*http("PATCH", f"{url}/api/v2/buckets/{buckets[0]['id']}",
                          {"retentionRules": rules or [{"type": "expire", "everySeconds": 0}]},
                          token=token), (200,), f"setting the retention of bucket {name}")
    tasks = _expect(*http("GET", f"{url}/api/v2/tasks?orgID={org_id}&name={OLD_TASK_NAME}",
                          token=token), (200,), f"finding task {OLD_TASK_NAME}")["tasks"]
    for task in tasks:
        _expect(*http("DELETE", f"{url}/api/v2/tasks/{task['id']}", token=token),
                (204, 404), f"deleting the old task {OLD_TASK_NAME}")
