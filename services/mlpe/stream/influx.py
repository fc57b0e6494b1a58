"""Batched, retried writes of line protocol to InfluxDB (async client)."""

from __future__ import annotations

import asyncio
import logging

from influxdb_client import WritePrecision
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

from mlpe.common.logs import register_secret
from mlpe.common.settings import Settings
from mlpe.stream.windows import escape_tag

log = logging.getLogger("mlpe.stream.influx")
CHUNK = 5_000  # lines per HTTP request


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
              f"value={float(alert.value)!r}", f"threshold={float(alert.threshold)!r}",
              f"fingerprint={_text(alert.fingerprint)}"]
    ts = (alert.starts_at_ns if firing else alert.ends_at_ns) or alert.detected_at_ns
    return f"alert,{','.join(tags)} {','.join(fields)} {ts}"


class InfluxWriter:
    def __init__(self, settings: Settings):
        from mlpe.stack.influxdb import read_token

        self.settings = settings
        self.token = read_token(settings)
        register_secret(self.token)
        self.client: InfluxDBClientAsync | None = None
        self.failures = 0

    async def _api(self):
        if self.client is None:
            if not self.token:
                raise RuntimeError("no InfluxDB token: set MLPE_INFLUX_TOKEN or run "
                                   "`mlpe stack up` (it stores one in .mlpe/secrets)")
            self.client = InfluxDBClientAsync(url=self.settings.influx_url, token=self.token,
                                              org=self.settings.influx_org, timeout=10_000)
        return self.client.write_api()

    async def write(self, lines: list[str]) -> None:
        """Write every line; on failure retry with backoff (up to 5 s) until it succeeds."""
        delay = 0.2
        for start in range(0, len(lines), CHUNK):
            chunk = lines[start:start + CHUNK]
            while True:
                try:
                    api = await self._api()
                    await api.write(bucket=self.settings.influx_bucket, record=chunk,
                                    write_precision=WritePrecision.NS)
                    break
                except Exception as err:  # noqa: BLE001 - HTTP, connection and API errors
                    self.failures += 1
                    log.warning("influxdb write failed (%s); retrying in %.1f s",
                                type(err).__name__ + ": " + str(err)[:200], delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
