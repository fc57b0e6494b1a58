"""Slack incoming-webhook messages: blocks a person can read, posted with retries.

Everything taken from an alert is escaped for mrkdwn (`&`, `<`, `>`) and clipped, and
every text object is `verbatim` (no auto-linking of URLs, channels or names): no alert
can add a mention (`<!channel>`) or a link, nor make a message Slack refuses. Slack
refuses a message of more than 50 blocks or a text object over 3,000 characters, so a
large group goes out as several numbered messages."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json

import aiohttp

from mlpe.common.logs import redact, register_secret
from mlpe.v1 import alerts_pb2

ICON = {alerts_pb2.SEVERITY_CRITICAL: ":red_circle:", alerts_pb2.SEVERITY_WARNING: ":warning:",
        alerts_pb2.SEVERITY_INFO: ":information_source:"}
RETRYABLE = {429, 500, 502, 503, 504}
# The message itself is at fault (Slack: 400 invalid_blocks / invalid_payload / no_text,
# 413 too large): sending it again can never succeed. 403/404/410 are the webhook's
# configuration (revoked, archived channel): fixed by an operator, so those are kept.
REFUSED = {400, 413}

# Slack's limits (Block Kit reference) and ours, in characters after escaping.
MAX_BLOCKS = 50              # per message
MAX_TEXT_OBJECT = 3_000      # any text object: section text, context element
MAX_MESSAGE_TEXT = 40_000    # top-level "text"
ALERTS_PER_MESSAGE = 24      # 2 blocks each + 1 "part k/n" block = 49 ≤ MAX_BLOCKS
TITLE_CHARS = 300            # summary (or rule) shown as the title
EXPLANATION_CHARS = 2_400    # icon + title + explanation stay under MAX_TEXT_OBJECT
LABEL_CHARS = 200            # one label's key=value
LABELS_CHARS = 1_800         # all labels of one alert
NAME_CHARS = 100             # detector


class WebhookError(RuntimeError):
    """A post that failed for good; the message never contains the URL."""


class WebhookRefused(WebhookError):
    """The webhook refused this message (HTTP 400/413): retrying it can never succeed."""


def escape(text: str) -> str:
    """Slack mrkdwn escaping: after it, `<`…`>` (mentions, links) cannot appear."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def clip(escaped: str, limit: int) -> str:
    """`escaped` cut to at most `limit` characters with "…", never inside an entity."""
    if len(escaped) <= limit:
        return escaped
    cut = escaped[:limit - 1]
    amp = cut.rfind("&", len(cut) - 5)
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut + "…"


def safe(text: str, limit: int, *, one_line: bool = True) -> str:
    """A value from an alert as mrkdwn: escaped, clipped, on one line unless allowed."""
    if one_line:  # a newline in a title or label would start a line of its own
        text = text.replace("\r", " ").replace("\n", " ")
    return clip(escape(text[:limit * 2]), limit)  # cut first: a 1 MB summary costs little


def link(url: str, label: str) -> str:
    """Our own link (a URL from settings): both parts escaped, so a label cannot break out."""
    return f"<{escape(url)}|{escape(label).replace('|', '¦')}>"


def _mrkdwn(text: str) -> dict:
    return {"type": "mrkdwn", "text": clip(text, MAX_TEXT_OBJECT), "verbatim": True}


def _when(ns: int) -> str:
    try:
        return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%H:%M:%S UTC") \
            if ns else "?"
    except (OverflowError, OSError, ValueError):  # a timestamp out of any calendar
        return "?"


def _number(x: float) -> str:
    return f"{x:g}"  # nan and inf print as such


def _title(a: alerts_pb2.Alert) -> str:
    return safe(a.summary or a.rule, TITLE_CHARS)


def _alert_blocks(a: alerts_pb2.Alert) -> list[dict]:
    resolved = a.state == alerts_pb2.ALERT_RESOLVED
    icon = ":white_check_mark:" if resolved else ICON.get(a.severity, ":warning:")
    title = f"{'RESOLVED: ' if resolved else ''}{_title(a)}"
    labels = clip(", ".join(safe(f"{k}={v}", LABEL_CHARS) for k, v in sorted(a.labels.items())),
                  LABELS_CHARS)
    timing = f"since {_when(a.starts_at_ns)}" + (
        f", cleared {_when(a.ends_at_ns)}" if resolved else "")
    explanation = safe(a.explanation, EXPLANATION_CHARS, one_line=False)
    return [
        {"type": "section", "text": _mrkdwn(f"{icon} *{title}*\n{explanation}")},
        {"type": "context", "elements": [_mrkdwn(
            f"{safe(a.detector, NAME_CHARS) or 'rule'} · {labels} · value "
            f"{_number(a.value)} vs {_number(a.threshold)} · {timing}")]},
    ]


def format_messages(alerts: list[alerts_pb2.Alert]) -> list[dict]:
    """Slack messages (text fallback + blocks) for a group of alerts: one, or several
    numbered "(k/n)" of ALERTS_PER_MESSAGE alerts each, every one within Slack's limits."""
    parts = [alerts[i:i + ALERTS_PER_MESSAGE]
             for i in range(0, len(alerts), ALERTS_PER_MESSAGE)] or [[]]
    messages = []
    for k, part in enumerate(parts, 1):
        blocks = []
        numbered = f" ({k}/{len(parts)})" if len(parts) > 1 else ""
        if numbered:
            blocks.append({"type": "context", "elements": [_mrkdwn(
                f"part {k} of {len(parts)} · {len(alerts)} alerts in this group")]})
        for a in part:
            blocks += _alert_blocks(a)
        first = part[0] if part else alerts_pb2.Alert()
        more = f" (+{len(part) - 1} more)" if len(part) > 1 else ""
        state = "RESOLVED" if first.state == alerts_pb2.ALERT_RESOLVED else "FIRING"
        text = clip(f"[{state}] {_title(first)}{more}{numbered}", MAX_MESSAGE_TEXT)
        messages.append({"text": text, "blocks": blocks})
    return messages


def format_message(alerts: list[alerts_pb2.Alert]) -> dict:
    """One Slack message for a group of at most ALERTS_PER_MESSAGE alerts."""
    if len(alerts) > ALERTS_PER_MESSAGE:
        raise ValueError(f"{len(alerts)} alerts do not fit one message; use format_messages")
    return format_messages(alerts)[0]


def limits_broken(payload: object) -> str | None:
    """Why Slack would refuse `payload` as a message (its documented limits), or None.
    The webhook sink answers with it as Slack does: 400 and this text."""
    if not isinstance(payload, dict):
        return "invalid_payload"
    text, blocks = payload.get("text", ""), payload.get("blocks", [])
    if not isinstance(text, str) or not isinstance(blocks, list):
        return "invalid_payload"
    if not text and not blocks:
        return "no_text"
    if len(text) > MAX_MESSAGE_TEXT:
        return "invalid_blocks"  # the brief: one answer for every limit
    if len(blocks) > MAX_BLOCKS:
        return "invalid_blocks"
    for block in blocks:
        if not isinstance(block, dict):
            return "invalid_blocks"
        objects = [block.get("text")] if "text" in block else []
        objects += block.get("elements", []) if block.get("type") == "context" else []
        objects += block.get("fields", []) or []
        for obj in objects:
            body = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(body, str) or not 1 <= len(body) <= MAX_TEXT_OBJECT:
                return "invalid_blocks"
    return None


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
                    if response.status in REFUSED:
                        raise WebhookRefused(f"webhook refused the message for good: {last}")
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
    `mlpe notify` formatted (format_messages above: this is its inverse). Each alert is a
    section followed by its context; a "part k of n" context before them is skipped."""
    blocks = json.loads(body).get("blocks", [])
    out = []
    for section, context in itertools.pairwise(blocks):
        if section.get("type") != "section" or context.get("type") != "context":
            continue
        first_line = section["text"]["text"].split("\n")[0]  # ":icon: *[RESOLVED: ]title*"
        title = unescape(first_line.split(" *", 1)[-1].rstrip("*"))
        resolved = title.startswith("RESOLVED: ")
        detector, labels_text, *_ = context["elements"][0]["text"].split(" · ")
        labels = dict(unescape(pair).split("=", 1)
                      for pair in labels_text.split(", ") if "=" in pair)
        out.append((title.removeprefix("RESOLVED: "), unescape(detector), labels, not resolved))
    return out
