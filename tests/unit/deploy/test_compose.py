"""docker-compose.yml uses the local stack's variable names, and they validate."""

import re
from pathlib import Path

import yaml

from mlpe.common.settings import load
from tests.helpers import REPO_ROOT

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def _substitute(value: str) -> str:
    # ${NAME:-default} -> default; ${NAME:?msg} / ${NAME} -> a stand-in value
    value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Z_]+(:\?[^}]*)?\}", "stand-in-secret-value", value)


def test_stack_services_present():
    assert {"kafka", "influxdb", "redis", "grafana"} <= set(COMPOSE["services"])


def test_mlpe_environment_is_valid_settings():
    for name, service in COMPOSE["services"].items():
        if not name.startswith("mlpe"):
            continue
        env = {k: _substitute(str(v)) for k, v in service["environment"].items()}
        assert all(k.startswith("MLPE_") for k in env), name
        settings = load(env)
        assert settings.kafka_bootstrap == "kafka:29092"
        assert settings.redis_url.startswith("redis://redis:")


def test_grafana_mounts_exist():
    for volume in COMPOSE["services"]["grafana"]["volumes"]:
        source = volume.split(":")[0]
        assert (REPO_ROOT / source).resolve().is_dir(), source
    assert Path(REPO_ROOT / "deploy/grafana/provisioning/datasources/influxdb.yaml").exists()


def _pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", path.read_text(), re.M))


def test_the_image_installs_runtime_pins_equal_to_the_dev_lock():
    dev, runtime = _pins(REPO_ROOT / "requirements.lock"), _pins(
        REPO_ROOT / "requirements-runtime.lock")
    assert runtime and {name: dev.get(name) for name in runtime} == runtime
    assert not {"pytest", "ruff", "kubernetes-validate", "hypothesis"} & set(runtime)
    assert "requirements-runtime.lock" in (REPO_ROOT / "Dockerfile").read_text()


def test_every_mlpe_service_command_parses_and_the_sink_is_the_default_webhook():
    from mlpe.cli import build_parser

    commands = {name: s["command"] for name, s in COMPOSE["services"].items()
                if name.startswith("mlpe")}
    assert {"mlpe-stream", "mlpe-notify", "mlpe-optimizer", "mlpe-control",
            "mlpe-agent"} <= set(commands)
    for name, argv in commands.items():
        assert callable(build_parser().parse_args(argv).func), name
    webhook = COMPOSE["services"]["mlpe-notify"]["environment"]["MLPE_SLACK_WEBHOOK_URL"]
    sink = build_parser().parse_args(COMPOSE["services"]["mlpe-webhook-sink"]["command"])
    assert _substitute(webhook) == f"http://mlpe-webhook-sink:{sink.port}/hook"
