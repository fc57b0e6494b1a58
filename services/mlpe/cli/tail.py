"""`mlpe tail TOPIC`: decode and print what flows through an mlpe topic, for debugging."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import uuid

import numpy as np
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from mlpe.common import batches
from mlpe.common.settings import Settings
from mlpe.common.topics import (
    ALERTS,
    ALL_TOPICS,
    COST_EVENTS,
    DEAD_LETTER,
    GPU_METRICS,
    HOST_METRICS,
    INVENTORY,
    KERNEL_EVENTS,
    PLACEMENT,
    TRAIN_EVENTS,
)
from mlpe.v1 import alerts_pb2, control_pb2, deadletter_pb2, metrics_pb2, training_pb2

MESSAGE_TYPES = {
    TRAIN_EVENTS.name: training_pb2.TrainStep,
    KERNEL_EVENTS.name: training_pb2.KernelSummary,
    COST_EVENTS.name: control_pb2.JobCost,
    ALERTS.name: alerts_pb2.Alert,
    DEAD_LETTER.name: deadletter_pb2.DeadLetter,
    INVENTORY.name: metrics_pb2.NodeInventory,
    PLACEMENT.name: training_pb2.JobPlacement,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tail", help="decode and print messages of an mlpe topic",
                       description="Decode and print messages of an mlpe topic as they arrive "
                       f"(topics: {', '.join(t.name for t in ALL_TOPICS)}).")
    p.add_argument("topic", help="topic name, e.g. mlpe.metrics.gpu")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("--from-beginning", action="store_true",
                   help="start at the oldest retained message (default: only new ones)")
    p.add_argument("-n", "--count", type=int, default=0,
                   help="stop after this many messages (default: run until Ctrl-C)")
    p.add_argument("--timeout", type=float, default=0,
                   help="stop after this many seconds without a message (default: never)")
    p.set_defaults(func=run)


def describe(topic: str, key: bytes | None, value: bytes | None) -> dict:
    """A message as a plain dict; undecodable input becomes {"error": why}."""
    out: dict = {"topic": topic, "key": key.decode(errors="replace") if key else None}
    if value is None:  # a compacted topic's deletion of `key`
        return {**out, "tombstone": True}
    if topic in (GPU_METRICS.name, HOST_METRICS.name):
        try:
            b = batches.decode(value)
        except batches.BatchError as err:
            return {**out, "error": str(err)}
        out.update(node=b.node_id, samples=b.samples,
                   first_time=_iso(b.timestamps_ns[0]) if b.samples else None,
                   devices=[{"device": int(b.device_indices[d]),
                             "uuid": b.device_uuids[d] or None,
                             "batch_seq": int(b.batch_seqs[d]),
                             "fields": {batches.field_name(f): _summary(v[d])
                                        for f, v in b.columns.items()},
                             "events": [MessageToDict(e) for e in b.events[d]]}
                            for d in range(b.devices)])
        return out
    message_type = MESSAGE_TYPES.get(topic)
    if message_type is None:
        return {**out, "bytes": len(value)}
    try:
        message = message_type.FromString(value)
    except DecodeError as err:
        return {**out, "error": f"not a {message_type.__name__}: {err}"}
    return {**out, **MessageToDict(message, preserving_proto_field_name=True)}


def _summary(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {"last": None}
    return {"last": _num(values[-1]), "mean": _num(finite.mean()),
            "min": _num(finite.min()), "max": _num(finite.max())}


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 3)


def _iso(ns: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def render(d: dict) -> str:
    if "error" in d:
        return f"{d['topic']} key={d['key']}: UNDECODABLE: {d['error']}"
    if "devices" in d:
        lines = []
        for dev in d["devices"]:
            fields = " ".join(f"{name}={v['last']}" for name, v in dev["fields"].items())
            events = f" events={dev['events']}" if dev["events"] else ""
            lines.append(f"{d['first_time']} {d['node']} dev{dev['device']} "
                         f"seq={dev['batch_seq']} n={d['samples']} {fields}{events}")
        return "\n".join(lines)
    rest = {k: v for k, v in d.items() if k not in ("topic", "key")}
    return f"{d['topic']} key={d['key']} {json.dumps(rest, separators=(',', ':'))}"


async def _tail(args, settings: Settings) -> int:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(
        args.topic, bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"mlpe-tail-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
        auto_offset_reset="earliest" if args.from_beginning else "latest",
    )
    try:
        await consumer.start()
    except KafkaError as err:
        print(f"mlpe tail: cannot reach Kafka at {settings.kafka_bootstrap}: {err}",
              file=sys.stderr)
        return 1
    seen = 0
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=int(args.timeout * 1000) or 1000)
            if not batch and args.timeout:
                return 0
            for records in batch.values():
                for r in records:
                    d = describe(r.topic, r.key, r.value)
                    print(json.dumps(d) if args.json else render(d), flush=True)
                    seen += 1
                    if args.count and seen >= args.count:
                        return 0
    finally:
        await consumer.stop()


def run(args, settings: Settings) -> int:
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if args.topic not in {t.name for t in ALL_TOPICS}:
        print(f"mlpe tail: {args.topic!r} is not an mlpe topic; choose from "
              f"{', '.join(t.name for t in ALL_TOPICS)}", file=sys.stderr)
        return 2
    if args.count < 0 or args.timeout < 0:
        print("mlpe tail: --count and --timeout must not be negative", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_tail(args, settings))
    except KeyboardInterrupt:
        return 0
