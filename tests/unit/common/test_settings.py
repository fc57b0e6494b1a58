from pathlib import Path

import pytest

from mlpe.common.settings import SettingsError, load


def test_defaults_are_the_local_stack():
    s = load({})
    assert (s.kafka_bootstrap, s.influx_url, s.redis_url) == (
        "127.0.0.1:9092", "http://127.0.0.1:8086", "redis://127.0.0.1:6379/0")
    assert s.kafka_controller_port == 9093
    assert s.state_dir == Path.home() / ".local" / "state" / "mlpe"
    assert load({"XDG_STATE_HOME": "/x"}).state_dir == Path("/x/mlpe")
    assert s.influx_token is None and s.control_token is None and s.slack_webhook_url is None
    assert s.control_namespace == "mlpe" and s.optimizer_port == 50051
    assert Path(s.rules_path).name == "default.yaml" and Path(s.rules_path).exists()


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
        ("MLPE_OPTIMIZER_PORT", "0", "an integer from 1 to 65535"),
        ("MLPE_NOTIFY_START", "middle", "earliest, latest"),
        ("MLPE_CONTROL_NAMESPACE", " ", "is empty"),
        ("MLPE_INFLUX_RETENTION_1S", "1 day", "like 1d, 30d or 365d"),
        ("MLPE_INFLUX_RETENTION_10S", "30", "like 1d, 30d or 365d"),
        ("MLPE_INFLUX_RETENTION_1M", "-1d", "like 1d, 30d or 365d"),
        ("MLPE_INFLUX_RETENTION_1S", "30m", "at least 1h"),  # InfluxDB's shortest
        ("MLPE_INFLUX_RETENTION_10S", "1.5d", "like 1d, 30d or 365d"),
        ("MLPE_CONTROL_GPU_TYPE", "b300", "a GPU type, one of a100-40gb, a100-80gb"),
        ("MLPE_PRICING", "reserved", "on_demand, spot"),
        ("MLPE_IDLE_UTIL_PCT", "101", "a number from 0 to 100"),
    ],
)
def test_malformed_variable_is_named_with_expected_form(name, value, expected):
    with pytest.raises(SettingsError) as err:
        load({name: value})
    assert name in str(err.value)
    assert expected in str(err.value)


def test_secrets_are_not_in_repr():
    s = load({"MLPE_INFLUX_TOKEN": "super-secret-token-value", "MLPE_CONTROL_TOKEN": "ctl-secret",
              "SLACK_WEBHOOK_URL": "https://hooks.example/T0/B0/hook-secret",
              "TEAM_HOOK": "https://hooks.example/team-secret"})
    assert s.influx_token == "super-secret-token-value"
    assert s.slack_webhook_url.endswith("hook-secret")  # SLACK_WEBHOOK_URL as a fallback
    assert s.secret("MLPE_SLACK_WEBHOOK_URL") == s.slack_webhook_url
    assert s.secret("TEAM_HOOK").endswith("team-secret") and s.secret("NOT_SET") is None
    assert "secret" not in repr(s)


def test_a_malformed_webhook_url_is_refused_without_showing_it():
    with pytest.raises(SettingsError) as err:
        load({"MLPE_SLACK_WEBHOOK_URL": "hooks.example/secret-part"})
    assert "MLPE_SLACK_WEBHOOK_URL" in str(err.value) and "secret-part" not in str(err.value)


def test_tls_certificate_and_key_go_together():
    with pytest.raises(SettingsError, match="MLPE_CONTROL_TLS_CERT and MLPE_CONTROL_TLS_KEY"):
        load({"MLPE_CONTROL_TLS_CERT": "/etc/cert.pem"})
    s = load({"MLPE_CONTROL_TLS_CERT": "~/c.pem", "MLPE_CONTROL_TLS_KEY": "/k.pem"})
    assert (s.control_tls_cert, s.control_tls_key) == (Path.home() / "c.pem", Path("/k.pem"))


def test_state_dir_expands_user():
    assert load({"MLPE_STATE_DIR": "~/x"}).state_dir == Path.home() / "x"


def test_each_resolution_has_its_bucket_and_retention():
    s = load({})
    assert s.influx_buckets == {"mlpe": 365 * 86_400, "mlpe-1s": 86_400,
                                "mlpe-10s": 30 * 86_400, "mlpe-1m": 365 * 86_400}
    assert [s.influx_bucket_of(w) for w in ("1s", "10s", "1m", "")] == \
        ["mlpe-1s", "mlpe-10s", "mlpe-1m", "mlpe"]
    s = load({"MLPE_INFLUX_BUCKET": "b", "MLPE_INFLUX_RETENTION_1S": "12h",
              "MLPE_INFLUX_RETENTION_10S": "2w", "MLPE_INFLUX_RETENTION_1M": "0"})
    assert s.influx_buckets == {"b": 0, "b-1s": 12 * 3600, "b-10s": 14 * 86_400, "b-1m": 0}
