"""`mlpe webhook-sink`: a local stand-in for Slack incoming webhooks that records what it gets.

POST anything to any path: the body is appended (one JSON line) to --record and
kept in memory; GET /received returns what was accepted. --fail answers the
first requests with given statuses (e.g. 500,429) to exercise retries.
Slack's limits are enforced as Slack does (400 and the reason, nothing recorded): at
most 50 blocks, every text object 1-3,000 characters, top-level text ≤ 40,000.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aiohttp import web

from mlpe.notify.slack import limits_broken


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("webhook-sink", help="record webhook posts locally (tests, make run)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--record", default=None, metavar="FILE",
                   help="append every accepted post here as a JSON line")
    p.add_argument("--fail", default="", metavar="CODES",
                   help="answer the first requests with these statuses, e.g. 500,429")
    p.add_argument("--retry-after", type=float, default=None,
                   help="send Retry-After (seconds) with --fail answers")
    p.set_defaults(func=run)


def make_app(record: Path | None, fail: list[int], retry_after: float | None) -> web.Application:
    received: list[dict] = []
    attempts: list[dict] = []
    failures = list(fail)

    async def post(request: web.Request) -> web.Response:
        body = await request.text()
        entry = {"path": request.path, "received_at": time.time(), "body": body}
        attempt = {**entry, "status": failures[0] if failures else 200}
        attempts.append(attempt)
        if failures:
            status = failures.pop(0)
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
            return web.Response(status=status, text="failing on purpose", headers=headers)
        try:
            broken = limits_broken(json.loads(body))
        except ValueError:
            broken = "invalid_payload"
        if broken:
            attempt.update(status=400, refused=broken)
            return web.Response(status=400, text=broken)
        received.append(entry)
        if record is not None:
            with record.open("a") as out:
                out.write(json.dumps(entry) + "\n")
        return web.Response(text="ok")

    async def list_received(_request: web.Request) -> web.Response:
        return web.json_response({"received": received, "attempts": attempts})

    app = web.Application()
    app.router.add_get("/received", list_received)
    app.router.add_post("/{tail:.*}", post)
    return app


def run(args, settings) -> int:
    try:
        fail = [int(code) for code in args.fail.split(",") if code.strip()]
    except ValueError:
        print(f"mlpe webhook-sink: --fail {args.fail!r}: expected HTTP statuses like 500,429")
        return 2
    record = Path(args.record) if args.record else None
    print(f"webhook-sink listening on http://{args.host}:{args.port}/", flush=True)
    web.run_app(make_app(record, fail, args.retry_after), host=args.host, port=args.port,
                print=None)
    return 0
