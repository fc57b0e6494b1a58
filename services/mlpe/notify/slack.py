"""Slack incoming-webhook messages: blocks a person can read, posted with retries."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json

import aiohttp

from mlpe.common.logs import redact, register_secret
from mlpe.v1 import alerts_pb2

ICON = {alerts_pb2.SEVERITY_CRITICAL: ":red_circle:", alerts_pb2.SEVERITY_WARNING: ":warning:",
        alerts_pb2.SEVERITY_INFO: ":information_source:"}
RETRYABLE = {429, 500, 502, 503, 504}


class WebhookError(RuntimeError):
    """A post that failed for good; the message never contains the URL."""


def _when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%H:%M:%S UTC") if ns else "?"


def format_message(alerts: list[alerts_pb2.Alert]) -> dict:
    """One Slack message (text fallback + blocks) for a group of alerts."""
    blocks = []
    for a in alerts:
        resolved = a.state == alerts_pb2.ALERT_RESOLVED
        icon = ":white_check_mark:" if resolved else ICON.get(a.severity, ":warning:")
        title = f"{'RESOLVED: ' if resolved else ''}{a.summary or a.rule}"
        labels = ", ".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
        timing = f"since {_when(a.starts_at_ns)}" + (
            f", cleared {_when(a.ends_at_ns)}" if resolved else "")
        blocks += [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"{icon} *{title}*\n"
                                         f"{a.explanation}"}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text":
                f"{a.detector or 'rule'} · {labels} · value {a.value:g} vs {a.threshold:g}"
                f" · {timing}"}]},
        ]
    first = alerts[0]
    more = f" (+{len(alerts) - 1} more)" if len(alerts) > 1 else ""
    state = "RESOLVED" if first.state == alerts_pb2.ALERT_RESOLVED else "FIRING"
    return {"text": f"[{state}] {first.summary or first.rule}{more}", "blocks": blocks}


async def post(url: str, payload: dict, *, attempts: int = 6, max_delay_s: float = 30.0,
               timeout_s: float = 10.0) -> None:
    """POST with retries on 429/5xx and connection errors, honouring Retry-After."""
    register_secret(url)
    delay = 0.5
    last = "no attempt"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        for attempt in range(1, attempts + 1):
            try:
                async with http.post(url, json=payload) as response:
                    if response.status < 300:
                        return
                    body = (await response.text())[:200]
                    last = f"HTTP {response.status} {redact(body)!r}"
                    if response.status not in RETRYABLE:
                        raise WebhookError(f"webhook refused the message: {last}")
                    retry_after = response.headers.get("Retry-After")
                    wait = delay
                    if retry_after:
                        with contextlib.suppress(ValueError):
                            wait = min(float(retry_after), max_delay_s)
            except (aiohttp.ClientError, TimeoutError) as err:
                last = f"{type(err).__name__}: {redact(str(err))}"
                wait = delay
            if attempt < attempts:
                await asyncio.sleep(wait)
                delay = min(delay * 2, max_delay_s)
    raise WebhookError(f"webhook failed after {attempts} attempts, last: {last}")


def parse_message(body: str) -> list[tuple[str, str, dict[str, str], bool]]:
    """(rule title, detector, labels, firing) per alert of a Slack message that
    `mlpe notify` formatted (format_message above: this is its inverse)."""
    blocks = json.loads(body).get("blocks", [])
    out = []
    for section, context in zip(blocks[::2], blocks[1::2], strict=False):
        first_line = section["text"]["text"].split("\n")[0]  # ":icon: *[RESOLVED: ]title*"
        title = first_line.split(" *", 1)[-1].rstrip("*")
        resolved = title.startswith("RESOLVED: ")
        detector, labels_text, *_ = context["elements"][0]["text"].split(" · ")
        labels = dict(pair.split("=", 1) for pair in labels_text.split(", ") if "=" in pair)
        out.append((title.removeprefix("RESOLVED: "), detector, labels, not resolved))
    return out
