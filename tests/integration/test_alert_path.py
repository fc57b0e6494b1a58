"""Be told: a simulated Xid travels agent → Kafka → stream → mlpe.alerts → notify → webhook,
once, and its resolution-free alert is not repeated."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

from mlpe.agent.agent import Agent
from mlpe.agent.scenario import parse
from mlpe.agent.shipper import Shipper
from mlpe.agent.sources.sim import SimulatedGpus
from mlpe.agent.spool import Spool

from .test_notify import received, start_sink
from .test_stream import start_stream, stop, stream_env  # noqa: F401 - fixture


async def test_xid_reaches_the_webhook_once(stream_env, unique, tmp_path):  # noqa: F811
    runner, base = await start_sink()
    env = {**os.environ, "MLPE_SLACK_WEBHOOK_URL": f"{base}/hook",
           "MLPE_NOTIFY_GROUP_ID": f"test-notify-{unique}",
           "MLPE_NOTIFY_REDIS_PREFIX": f"test:{unique}"}
    notify = subprocess.Popen([sys.executable, "-m", "mlpe.cli", "notify", "--group-wait", "0.5"],
                              env=env, stdout=(tmp_path / "notify.log").open("wb"),
                              stderr=subprocess.STDOUT)
    stream = start_stream(unique, tmp_path / "stream.log")
    node = f"x{unique}"
    try:
        scenario = parse("nodes: 1\ngpus_per_node: 2\nfaults:\n"
                         "  - {kind: xid, node: 0, gpu: 1, at_s: 2, code: 79}\n")
        sim = SimulatedGpus(scenario, 100, node_prefix=f"{node}-")
        agent = Agent([(sim, 100)], Shipper(stream_env.kafka_bootstrap,
                                            Spool(tmp_path / "spool")), hz=100)
        started = time.time()
        await agent.run(duration_s=6)
        mine = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not mine:
            for proc, name in ((notify, "notify"), (stream, "stream")):
                assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-2000:]
            mine = [r for r in (await received(base))["received"] if node in r["body"]]
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # would a second message for the same Xid arrive? it must not
        mine = [r for r in (await received(base))["received"] if node in r["body"]]
        assert len(mine) == 1, mine
        text = json.loads(mine[0]["body"])["text"]
        assert text == f"[FIRING] Xid 79 on GPU 1 on {node}-00"
        print(f"xid delay onset→webhook: {mine[0]['received_at'] - (started + 2):.2f} s")
    finally:
        stop(stream)
        notify.terminate()
        notify.wait(timeout=30)
        await runner.cleanup()
