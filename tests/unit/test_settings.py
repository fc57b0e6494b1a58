from pathlib import Path

import pytest

from mlpe.common.settings import SettingsError, load


def test_defaults_are_the_local_stack():
    s = load({})
    assert (s.kafka_bootstrap, s.influx_url, s.redis_url) == (
        "127.0.0.1:9092", "http://127.0.0.1:8086", "redis://127.0.0.1:6379/0")
    assert s.kafka_controller_port == 9093
    assert s.state_dir.name == ".mlpe"
    assert s.influx_token is None


def test_ports_flow_into_addresses():
    s = load({"MLPE_KAFKA_PORT": "19092", "MLPE_INFLUX_PORT": "18086", "MLPE_REDIS_PORT": "16379"})
    assert s.kafka_bootstrap == "127.0.0.1:19092"
    assert s.kafka_controller_port == 19093
    assert s.influx_url == "http://127.0.0.1:18086"
    assert s.redis_url == "redis://127.0.0.1:16379/0"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MLPE_KAFKA_PORT", "abc", "an integer from 1 to 65535"),
        ("MLPE_REDIS_PORT", "70000", "an integer from 1 to 65535"),
        ("MLPE_INFLUX_URL", "localhost:8086", "http://host:port"),
        ("MLPE_INFLUX_URL", "http://host:notaport", "MLPE_INFLUX_URL"),
        ("MLPE_REDIS_URL", "http://x:1", "redis://host:port"),
        ("MLPE_KAFKA_BOOTSTRAP", "broker", "host:port"),
        ("MLPE_LOG_LEVEL", "loud", "debug, info"),
        ("MLPE_KAFKA_HEAP", "lots", "512m"),
        ("MLPE_INFLUX_ORG", "  ", "is empty"),
    ],
)
def test_malformed_variable_is_named_with_expected_form(name, value, expected):
    with pytest.raises(SettingsError) as err:
        load({name: value})
    assert name in str(err.value)
    assert expected in str(err.value)


def test_token_is_not_in_repr():
    s = load({"MLPE_INFLUX_TOKEN": "super-secret-token-value"})
    assert s.influx_token == "super-secret-token-value"
    assert "super-secret" not in repr(s)


def test_state_dir_expands_user():
    assert load({"MLPE_STATE_DIR": "~/x"}).state_dir == Path.home() / "x"
