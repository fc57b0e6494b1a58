"""The local stack (Kafka, InfluxDB, Redis) without Docker: install, up, down, status."""

from __future__ import annotations

import asyncio
import fcntl
from collections.abc import Iterator
from contextlib import contextmanager

from mlpe.common.kafka import SHORT_LIVED_APPS, create_topics, prune_finished_apps
from mlpe.common.settings import Settings
from mlpe.common.topics import configured
from mlpe.stack.component import StackError, Status
from mlpe.stack.influxdb import InfluxDB
from mlpe.stack.kafka import Kafka
from mlpe.stack.redis import Redis

__all__ = ["COMPONENT_NAMES", "StackError", "Status", "down", "ensure_topics", "install",
           "prune", "status", "up"]

COMPONENT_NAMES = ("kafka", "influxdb", "redis")


def _components(settings: Settings, only: tuple[str, ...] | None = None) -> list:
    chosen = [Kafka(settings), InfluxDB(settings), Redis(settings)]
    if only:
        unknown = set(only) - set(COMPONENT_NAMES)
        if unknown:
            raise StackError(f"unknown component(s) {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(COMPONENT_NAMES)}")
        chosen = [c for c in chosen if c.name in only]
    return chosen


@contextmanager
def _exclusive(settings: Settings) -> Iterator[None]:
    """One `up`/`down` at a time per state directory (parallel test runs, two shells)."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with (settings.run_dir / "stack.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def install(settings: Settings, only: tuple[str, ...] | None = None) -> None:
    """Fetch or build whatever is missing into the per-user cache (idempotent)."""
    for component in _components(settings, only):
        component.install()


def up(settings: Settings, only: tuple[str, ...] | None = None) -> list[Status]:
    """Install, start and wait for each component; a running one is left as it is."""
    with _exclusive(settings):
        components = _components(settings, only)
        for component in components:
            component.install()
        started = [(component, component.start()) for component in components]
        for component, proc in started:  # they boot in parallel; wait for each
            component.wait_ready(proc)
        return [component.status() for component in components]


def down(settings: Settings, only: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """Stop what `up` started (never an external server); returns (name, what happened)."""
    outcome = []
    with _exclusive(settings):
        for component in reversed(_components(settings, only)):
            if component.stop():
                outcome.append((component.name, "stopped"))
            elif component.status().state == "up":
                outcome.append((component.name, "running, but not started by mlpe: left alone"))
            else:
                outcome.append((component.name, "not running"))
    return outcome


def ensure_topics(settings: Settings) -> list[str]:
    """Create the mlpe topics missing on the configured Kafka (local or not)."""
    try:
        return asyncio.run(create_topics(settings.kafka_bootstrap, configured(settings)))
    except Exception as err:  # noqa: BLE001 - aiokafka raises several kinds
        raise StackError(f"kafka: cannot create topics on {settings.kafka_bootstrap}: "
                         f"{err or type(err).__name__}") from None


def prune(settings: Settings, prefixes: tuple[str, ...] = SHORT_LIVED_APPS) -> dict[str, int]:
    """Delete the internal Kafka topics of finished test, benchmark and `mlpe run` stream
    apps (their consumer group has no member); returns {app id: topics deleted}. Left
    behind, thousands of them made every broker start take minutes."""
    try:
        return asyncio.run(prune_finished_apps(settings.kafka_bootstrap, prefixes))
    except Exception as err:  # noqa: BLE001 - aiokafka raises several kinds
        raise StackError(f"kafka: cannot prune topics on {settings.kafka_bootstrap}: "
                         f"{err or type(err).__name__}") from None


def status(settings: Settings, only: tuple[str, ...] | None = None) -> list[Status]:
    return [component.status() for component in _components(settings, only)]
