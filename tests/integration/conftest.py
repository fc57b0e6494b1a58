"""The real stack for integration tests.

Local (default): use the stack if `mlpe stack up` already runs it, else start it
and stop afterwards what this session started — except under pytest-xdist, whose
workers share the stack and end at different times: there it is left running (`make
test` starts it before the workers and stops it after them). With MLPE_TEST_STACK=docker and a
Docker engine, testcontainers provides the same three servers instead. Either
way a stack that cannot start FAILS the tests; it never skips them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from influxdb_client import InfluxDBClient

from mlpe import stack
from mlpe.common import settings as settings_module
from mlpe.common.kafka import create_topics
from mlpe.stack import retention
from mlpe.stack.influxdb import InfluxDB, http_json
from tests.helpers import forget_topics


def pytest_collection_modifyitems(items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.integration)


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str
    influx_url: str
    influx_token: str = field(repr=False)
    influx_org: str
    influx_bucket: str
    redis_url: str

    def influx(self) -> InfluxDBClient:
        """A client of the stack's InfluxDB. Its read timeout is a minute, not the client's
        10 s: with the whole suite on two cores a query can take longer, and a timeout
        there failed tests whose data was all in place."""
        return InfluxDBClient(url=self.influx_url, token=self.influx_token,
                              org=self.influx_org, timeout=60_000)

    def bucket_of(self, window: str) -> str:
        """The bucket of a resolution ("1s", "10s", "1m"), as the stream writes it."""
        return settings_module.load({"MLPE_INFLUX_BUCKET": self.influx_bucket}) \
            .influx_bucket_of(window)


def _local_stack() -> Iterator[Endpoints]:
    settings = settings_module.load()
    before = {s.name: s.state for s in stack.status(settings)}
    try:
        stack.up(settings)
    except stack.StackError as err:
        pytest.fail(f"the local stack could not start: {err}", pytrace=False)
    token = InfluxDB(settings).token()
    assert token, "InfluxDB is up but no API token is stored"
    yield Endpoints(
        kafka_bootstrap=settings.kafka_bootstrap,
        influx_url=settings.influx_url,
        influx_token=token,
        influx_org=settings.influx_org,
        influx_bucket=settings.influx_bucket,
        redis_url=settings.redis_url,
    )
    started_here = tuple(name for name, state in before.items() if state != "up")
    shared = "PYTEST_XDIST_WORKER" in os.environ
    if started_here and not shared and not os.environ.get("MLPE_TEST_KEEP_STACK"):
        stack.down(settings, started_here)


def _docker_stack() -> Iterator[Endpoints]:
    from testcontainers.influxdb2 import InfluxDb2Container
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    token = uuid.uuid4().hex
    kafka = KafkaContainer().with_kraft()
    influx = InfluxDb2Container(
        "influxdb:2.7", init_mode="setup", username="mlpe", password=uuid.uuid4().hex,
        org_name="mlpe", bucket="mlpe", admin_token=token,
    )
    redis = RedisContainer("redis:7")
    try:
        with kafka, influx, redis:
            asyncio.run(create_topics(kafka.get_bootstrap_server()))
            retention.ensure(settings_module.load({}), http_json, influx.get_url(), token)
            yield Endpoints(
                kafka_bootstrap=kafka.get_bootstrap_server(),
                influx_url=influx.get_url(),
                influx_token=token,
                influx_org="mlpe",
                influx_bucket="mlpe",
                redis_url=f"redis://{redis.get_container_host_ip()}:"
                f"{redis.get_exposed_port(6379)}/0",
            )
    except Exception as err:  # noqa: BLE001 - any container failure fails the run
        pytest.fail(f"the docker stack could not start: {err}", pytrace=False)


@pytest.fixture(scope="session")
def stack_endpoints() -> Iterator[Endpoints]:
    mode = os.environ.get("MLPE_TEST_STACK", "local")
    if mode == "docker":
        yield from _docker_stack()
    elif mode == "local":
        yield from _local_stack()
    else:
        pytest.fail(f"MLPE_TEST_STACK={mode!r}: expected 'local' or 'docker'", pytrace=False)


@pytest.fixture
def unique(request) -> Iterator[str]:
    """A fresh suffix so tests never see each other's topics, keys or series. Afterwards
    the Kafka topics named with it are deleted (of a test on the stack)."""
    value = uuid.uuid4().hex[:12]
    endpoints = request.getfixturevalue("stack_endpoints") \
        if "stack_endpoints" in request.fixturenames else None
    yield value
    if endpoints is not None:
        forget_topics(endpoints.kafka_bootstrap, value)
