"""Storage that lasts: one InfluxDB bucket per resolution, each with its retention, and the
task that makes the 1 min resolution from the 10 s one.

The stream writes 1 s and 10 s windows (the writer routes each line to <bucket>-1s or
<bucket>-10s by its window tag); the InfluxDB task `mlpe-downsample-1m` writes 1 min
windows into <bucket>-1m every minute; alerts and kernel timings stay in the base bucket.
Retention comes from settings (MLPE_INFLUX_RETENTION_1S/10S/1M); `ensure` creates or
updates buckets and task to match, on every `mlpe stack up`, so it is idempotent and
works on a fresh server and on one set up before buckets per resolution existed.
"""

from __future__ import annotations

from collections.abc import Callable

from mlpe.common.settings import Settings
from mlpe.stack.component import StackError

TASK_NAME = "mlpe-downsample-1m"
# How each statistic of a 10 s window combines into a minute's. p95: the largest of the
# six 10 s p95s, an upper bound of the minute's (the samples are not kept to do better);
# mean: of the means, unweighted (a 10 s window holds ~the same samples as the next).
DOWNSAMPLE = (("_min", "min"), ("_max", "max"), ("_mean", "mean"), ("_p95", "max"),
              ("_last", "last"))
LOOKBACK = "2m"  # each minute is written twice: the second pass has its late 10 s windows
OFFSET = "20s"   # after the minute ends: its last 10 s window is written by then

Http = Callable[..., tuple[int, dict]]


def downsample_flux(settings: Settings, start: str, stop: str) -> str:
    """Flux that writes the 1 min windows of [start, stop) (Flux time expressions, aligned
    to the minute) from the 10 s bucket into the 1 min bucket, tagged window=1m."""
    src, dst = settings.influx_bucket_of("10s"), settings.influx_bucket_of("1m")
    parts = [f'one(field: /{suffix}$/, fn: {fn})' for suffix, fn in DOWNSAMPLE]
    # Each part is from |> range |> filter |> aggregateWindow with a field regex: a shape
    # InfluxDB pushes down into its storage engine. The first version filtered one shared
    # source with strings.hasSuffix, which is not pushed down: every run read every field
    # of every series six times in Flux, 35 s to 2 min of both cores for each minute of a
    # 384-GPU fleet, and runs overlapped.
    return f'''import "strings"

one = (field, fn) => from(bucket: "{src}")
  |> range(start: {start}, stop: {stop})
  |> filter(fn: (r) => r.window == "10s" and r._field =~ field)
  |> aggregateWindow(every: 1m, fn: fn, timeSrc: "_start", createEmpty: false)
samples = one(field: /^samples$/, fn: sum)

union(tables: [{", ".join(parts)}, samples])
  |> set(key: "window", value: "1m")
  |> to(bucket: "{dst}", org: "{settings.influx_org}")
'''


def task_flux(settings: Settings) -> str:
    """The task: every minute, the last LOOKBACK of whole minutes."""
    body = downsample_flux(settings, "start", "stop")
    head, _, rest = body.partition("\n\n")
    return (f'{head}\nimport "date"\n\n'
            f'option task = {{name: "{TASK_NAME}", every: 1m, offset: {OFFSET}}}\n\n'
            f'stop = date.truncate(t: now(), unit: 1m)\n'
            f'start = date.sub(d: {LOOKBACK}, from: stop)\n\n{rest}')


def _retention_rules(seconds: int) -> list[dict]:
    return [{"type": "expire", "everySeconds": seconds}] if seconds else []


def _expect(code: int, body: dict, ok: tuple[int, ...], what: str) -> dict:
    if code not in ok:
        raise StackError(f"influxdb: {what} failed (HTTP {code}: {body.get('message')})")
    return body


def ensure(settings: Settings, http: Http, url: str, token: str) -> None:
    """Every bucket with its retention, then the downsampling task, created or updated:
    active with MLPE_INFLUX_DOWNSAMPLE=on, else there but inactive."""
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
    flux, status = task_flux(settings), "active" if settings.influx_downsample else "inactive"
    tasks = _expect(*http("GET", f"{url}/api/v2/tasks?orgID={org_id}&name={TASK_NAME}",
                          token=token), (200,), f"finding task {TASK_NAME}")["tasks"]
    if not tasks:
        _expect(*http("POST", f"{url}/api/v2/tasks",
                      {"orgID": org_id, "flux": flux, "status": status}, token=token),
                (201,), f"creating task {TASK_NAME}")
    elif tasks[0].get("flux") != flux or tasks[0].get("status") != status:
        _expect(*http("PATCH", f"{url}/api/v2/tasks/{tasks[0]['id']}",
                      {"flux": flux, "status": status}, token=token),
                (200,), f"updating task {TASK_NAME}")
