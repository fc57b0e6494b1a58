"""Faust is real: a worker process consumes a real topic and produces to another."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.helpers import stop_child

HERE = Path(__file__).parent


async def test_faust_worker_consumes_a_real_topic(stack_endpoints, unique, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "ECHO_APP_ID": f"test-echo-{unique}",
        "ECHO_BOOTSTRAP": stack_endpoints.kafka_bootstrap,
        "ECHO_DATADIR": str(tmp_path / "faust"),
        "ECHO_IN": f"test.faust.in.{unique}",
        "ECHO_OUT": f"test.faust.out.{unique}",
    }
    log = (tmp_path / "worker.log").open("w+")
    worker = subprocess.Popen(
        # --without-web: the worker command would otherwise bind port 6066, which a
        # leftover worker (or anything else) may hold.
        [sys.executable, "-m", "faust", "-A", "faust_echo_app", "worker", "-l", "info",
         "--without-web"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    sent = [f"step-{i}".encode() for i in range(20)]
    producer = AIOKafkaProducer(bootstrap_servers=stack_endpoints.kafka_bootstrap)
    consumer = AIOKafkaConsumer(
        env["ECHO_OUT"], bootstrap_servers=stack_endpoints.kafka_bootstrap,
        auto_offset_reset="earliest", group_id=f"test-{unique}",
    )
    received: list[bytes] = []
    try:
        await producer.start()
        for value in sent:
            await producer.send_and_wait(env["ECHO_IN"], value)
        await consumer.start()
        async with asyncio.timeout(120):
            while len(received) < len(sent):
                assert worker.poll() is None, f"faust worker exited: {_tail(log)}"
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    received += [r.value for r in records]
    finally:
        await producer.stop()
        await consumer.stop()
        stop_child(worker, timeout=30)
    assert received == [value.upper() for value in sent], _tail(log)


def _tail(log) -> str:
    return "".join(Path(log.name).read_text().splitlines(keepends=True)[-40:])
