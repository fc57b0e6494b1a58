"""Batched, retried writes of line protocol to InfluxDB (async client)."""

from __future__ import annotations

import asyncio
import logging
import math
import re

from influxdb_client import WritePrecision
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.rest import ApiException

from mlpe.common.logs import register_secret
from mlpe.common.settings import Settings
from mlpe.stream.windows import escape_tag

log = logging.getLogger("mlpe.stream.influx")
CHUNK = 1_000  # lines per HTTP request (~100,000 values of GPU windows)
# Requests in flight at once: InfluxDB parses and indexes each request mostly on one
# core, so one request at a time left a worker's writes behind its windows (at 1 M
# values/s, written 15 s after their end and falling further) with InfluxDB at 40 %.
IN_FLIGHT = 4
# The window tag of a line's series key (before its first unescaped space).
_WINDOW = re.compile(r"^(?:[^ \\]|\\.)*?,window=([^ ,]+)[ ,]")


def bucket_of(settings: Settings, line: str) -> str:
    """Where a line goes: its resolution's bucket by its window tag, the base bucket for
    a line without one (alerts, kernel timings)."""
    match = _WINDOW.match(line)
    return settings.influx_bucket_of(match.group(1) if match else "")


def _text(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def alert_line(alert) -> str:
    """An alert as an InfluxDB point (measurement `alert`) for Grafana annotations; its
    timestamp is when the condition began (firing) or ended (resolved)."""
    from mlpe.v1 import alerts_pb2

    firing = alert.state == alerts_pb2.ALERT_FIRING
    severity = alerts_pb2.Severity.Name(alert.severity)
    tags = [f"rule={escape_tag(alert.rule)}", f"severity={severity}"]
    tags += [f"{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(alert.labels.items()) if v]
    fields = [f"state={_text('firing' if firing else 'resolved')}",
              f"summary={_text(alert.summary)}", f"explanation={_text(alert.explanation)}",
              f"fingerprint={_text(alert.fingerprint)}"]
    # Line protocol has no NaN or inf (a NaN loss is an alert's value): leave those out.
    fields += [f"{name}={number!r}" for name, number in
               (("value", float(alert.value)), ("threshold", float(alert.threshold)))
               if math.isfinite(number)]
    ts = (alert.starts_at_ns if firing else alert.ends_at_ns) or alert.detected_at_ns
    return f"alert,{','.join(tags)} {','.join(fields)} {ts}"


class InfluxWriter:
    def __init__(self, settings: Settings):
        from mlpe.common.tokens import influx_token

        self.settings = settings
        self.token = influx_token(settings)
        register_secret(self.token)
        self.client: InfluxDBClientAsync | None = None
        self.failures = 0
        self.rejected = 0   # malformed lines InfluxDB refused (dropped)
        self.beyond_retention = 0  # writes whose points were partly outside retention

    async def _api(self):
        if self.client is None:
            if not self.token:
                raise RuntimeError("no InfluxDB token: set MLPE_INFLUX_TOKEN or run "
                                   "`mlpe stack up` (it stores one in <state dir>/secrets)")
            self.client = InfluxDBClientAsync(url=self.settings.influx_url, token=self.token,
                                              org=self.settings.influx_org, timeout=10_000)
        return self.client.write_api()

    async def write(self, lines: list[str]) -> None:
        """Write every line, each to its resolution's bucket (bucket_of), IN_FLIGHT requests
        at a time; on failure retry with backoff (up to 5 s) until it succeeds. Lines
        InfluxDB refuses as malformed (HTTP 400) are found by halving the chunk, logged and
        dropped: one bad line must not hold back every window behind it."""
        by_bucket: dict[str, list[str]] = {}
        for line in lines:
            by_bucket.setdefault(bucket_of(self.settings, line), []).append(line)
        chunks = [(routed[start:start + CHUNK], bucket) for bucket, routed in by_bucket.items()
                  for start in range(0, len(routed), CHUNK)]
        if len(chunks) == 1:
            await self._write_chunk(*chunks[0])
            return
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one(chunk: list[str], bucket: str) -> None:
            async with slots:
                await self._write_chunk(chunk, bucket)

        await asyncio.gather(*(one(chunk, bucket) for chunk, bucket in chunks))

    async def _write_chunk(self, chunk: list[str], bucket: str) -> None:
        delay = 0.2
        while True:
            try:
                api = await self._api()
                await api.write(bucket=bucket, record=chunk,
                                write_precision=WritePrecision.NS)
                return
            except ApiException as err:
                if err.status == 422:
                    # "Partial write": InfluxDB wrote the rest and dropped the points
                    # outside the bucket's retention (a replay of old data, a clock far
                    # behind). Sending them again can never succeed: retrying for ever
                    # stalled every consumer behind this write.
                    self.beyond_retention += 1
                    log.warning("influxdb dropped points outside the retention of %s: %s",
                                bucket, str(err.body or err.reason)[:300])
                    return
                if err.status != 400:
                    self._retrying(err, delay)
                elif len(chunk) == 1:
                    self.rejected += 1
                    log.error("influxdb refused a line, dropped: %s | %s",
                              str(err.body or err.reason)[:300], chunk[0][:300])
                    return
                else:
                    half = len(chunk) // 2
                    await self._write_chunk(chunk[:half], bucket)
                    await self._write_chunk(chunk[half:], bucket)
                    return
            except Exception as err:  # noqa: BLE001 - connection errors and timeouts
                self._retrying(err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _retrying(self, err: Exception, delay: float) -> None:
        self.failures += 1
        log.warning("influxdb write failed (%s); retrying in %.1f s",
                    type(err).__name__ + ": " + str(err)[:200], delay)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
