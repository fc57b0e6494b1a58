"""One-line errors that name the component: taken ports, missing Java, unknown names."""

import socket

import pytest

from mlpe import stack
from mlpe.common.settings import load
from mlpe.stack.component import StackError
from mlpe.stack.influxdb import InfluxDB
from mlpe.stack.kafka import Kafka
from mlpe.stack.redis import Redis
from tests.helpers import free_port


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _settings(tmp_path, **ports):
    env = {"MLPE_STATE_DIR": str(tmp_path / "state"),
           "MLPE_KAFKA_PORT": str(free_port()),
           "MLPE_KAFKA_CONTROLLER_PORT": str(free_port()),
           "MLPE_INFLUX_PORT": str(free_port()),
           "MLPE_REDIS_PORT": str(free_port())}
    env.update({k: str(v) for k, v in ports.items()})
    return load(env)


@pytest.mark.parametrize(("component", "variable"), [
    (Kafka, "MLPE_KAFKA_PORT"), (InfluxDB, "MLPE_INFLUX_PORT"), (Redis, "MLPE_REDIS_PORT")])
def test_taken_port_names_component_variable_and_log(tmp_path, taken_port, component, variable):
    c = component(_settings(tmp_path, **{variable: taken_port}))
    with pytest.raises(StackError) as err:
        c.start()
    message = str(err.value)
    assert message.startswith(f"{c.name}: ")
    assert variable in message and str(taken_port) in message
    assert str(c.proc.log) in message
    assert "\n" not in message


def test_missing_java_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no java
    with pytest.raises(StackError, match=r"^kafka: Java 17\+ not found on PATH"):
        Kafka(_settings(tmp_path))._java()


def test_status_of_a_stopped_stack_says_down_with_a_reason(tmp_path):
    statuses = stack.status(_settings(tmp_path))
    assert [s.name for s in statuses] == ["kafka", "influxdb", "redis"]
    assert all(s.state == "down" and s.detail for s in statuses)


def test_unknown_component(tmp_path):
    with pytest.raises(StackError, match="unknown component"):
        stack.status(_settings(tmp_path), ("kafka", "zookeeper"))
