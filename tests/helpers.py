"""What many tests need, written once: the repository's folders, free ports, an isolated
stack's environment, the `mlpe` command as a subprocess, and stopping what a test started.

Tests live in the repository, so unlike mlpe's own code they may find its files by path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mlpe.common.process import free_port, stop_child, stop_children

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"

__all__ = ["DEPLOY", "REPO_ROOT", "forget_topics", "free_port", "isolated_stack_env", "mlpe",
           "mlpe_env", "start_mlpe", "stop_child", "stop_children", "stop_gracefully",
           "stop_leftovers", "tail", "uv"]


def uv() -> Path:
    """The uv that deploy/setup-python.sh installed into the per-user cache."""
    version = re.search(r"^UV_VERSION=(\S+)$", (DEPLOY / "setup-python.sh").read_text(),
                        re.MULTILINE).group(1)
    cache = Path(os.environ.get("MLPE_CACHE_DIR", Path.home() / ".cache" / "mlpe"))
    return cache / f"uv-{version}" / "bin" / "uv"


def mlpe_env(**overrides: str) -> dict[str, str]:
    """This process's environment plus `overrides`; a value of None removes the variable."""
    env = {**os.environ, **{k: v for k, v in overrides.items() if v is not None}}
    for name in [k for k, v in overrides.items() if v is None]:
        env.pop(name, None)
    return env


def mlpe(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
         check: bool = False) -> subprocess.CompletedProcess:
    """`mlpe ARGS` run to the end (output captured as text)."""
    done = subprocess.run([sys.executable, "-m", "mlpe.cli", *args], capture_output=True,
                          text=True, env=mlpe_env() if env is None else env, timeout=timeout)
    if check and done.returncode:
        raise AssertionError(f"mlpe {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


STARTED: list[subprocess.Popen] = []  # by start_mlpe: stopped at the session's end


def start_mlpe(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`mlpe ARGS` in the background, its output in `log`; stop it with stop_child (and
    if a test cannot, say after pytest's timeout, stop_leftovers does at the end)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "mlpe.cli", *args], env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    STARTED.append(child)
    return child


def stop_leftovers() -> None:
    """Stop whatever start_mlpe started that still runs: a test whose `finally` never ran
    (pytest-timeout's signal ends an asyncio test without it) left a stream worker
    publishing alerts for the rest of the machine's life."""
    stop_children([child for child in STARTED if child.poll() is None], timeout=10)


def stop_gracefully(proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    """SIGTERM a service the test started and fail the test if it ignores it for `timeout`
    seconds (it is killed then): graceful shutdown is part of what services promise."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{what} ignored SIGTERM for {timeout:.0f} s") from None


def isolated_stack_env(state_dir: Path, *components: str) -> dict[str, str]:
    """The environment of a second local stack beside the session's: its own state folder
    and free ports (the per-user cache is shared, so nothing is installed again). Only
    the ports of `components` are chosen (all three by default)."""
    wanted = set(components or ("kafka", "influxdb", "redis"))
    overrides: dict[str, str | None] = {
        "MLPE_STATE_DIR": str(state_dir), "MLPE_KAFKA_BOOTSTRAP": None,
        "MLPE_INFLUX_URL": None, "MLPE_REDIS_URL": None, "MLPE_INFLUX_TOKEN": None}
    if "kafka" in wanted:
        overrides.update(MLPE_KAFKA_PORT=str(free_port()),
                         MLPE_KAFKA_CONTROLLER_PORT=str(free_port()), MLPE_KAFKA_HEAP="384m")
    if "influxdb" in wanted:
        overrides["MLPE_INFLUX_PORT"] = str(free_port())
    if "redis" in wanted:
        overrides["MLPE_REDIS_PORT"] = str(free_port())
    return mlpe_env(**overrides)


def flip_a_byte(path: Path) -> None:
    """Corrupt a checkpoint file the way a bad disk would: one byte in its middle."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def kafka_record(topic: str, value: bytes | None, *, partition: int = 0, offset: int = 0,
                 key: bytes | None = b""):
    """What aiokafka's consumer hands over (topic, partition, offset, key, value)."""
    from types import SimpleNamespace

    return SimpleNamespace(topic=topic, partition=partition, offset=offset, key=key,
                           value=value)


async def tail(bootstrap: str, *topics):
    """A started consumer of every partition of these topics (mlpe.common.topics.Topic),
    positioned at their ends now: it reads what is sent after this returns. No group, so
    nothing to join before reading (a joining group's "latest" could be decided after
    the test sent) and nothing to commit on stop (a commit to a coordinator lost under
    load kept a test waiting until pytest's timeout)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(t.name, p) for t in topics for p in range(t.partitions)]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)  # resolved now, not at the first fetch
    except BaseException:
        await consumer.stop()
        raise
    return consumer


def parsed(message_type, records) -> list:
    """The records' values that are a `message_type` (a protobuf class), the others
    skipped: the stack's topics are shared, and the fuzz and notify tests write bytes
    that are no message on purpose, maybe at this very moment."""
    from google.protobuf.message import DecodeError

    out = []
    for record in records:
        try:
            out.append(message_type.FromString(record.value))
        except DecodeError:
            continue
    return out


def forget_topics(bootstrap: str, marker: str) -> None:
    """Delete the Kafka topics whose names hold `marker` (a test's unique suffix): its own
    and the internal ones of the stream apps it ran. Thousands left behind made every
    broker start take minutes. A failure here only warns: the test's verdict is in."""
    import asyncio
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from mlpe.common.kafka import delete_topics

    try:
        # A thread of its own: callable from async tests' fixtures too.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, delete_topics(bootstrap, lambda name: marker in name)) \
                .result()
    except Exception as err:  # noqa: BLE001 - cleanup; `mlpe stack prune` sweeps up later
        warnings.warn(f"could not delete the topics of {marker}: {err!r}", stacklevel=2)
