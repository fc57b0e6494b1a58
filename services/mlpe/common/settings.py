"""Every setting mlpe reads, from environment variables with defaults.

One place, so a typo'd or malformed variable is caught at start with an error
that names the variable and the form it expects. docker-compose.yml and the
local stack use the same names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parents[3]


class SettingsError(ValueError):
    """A malformed environment variable; the message names it."""


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, default).strip()
    if not value:
        raise SettingsError(f"{name} is empty; unset it to use the default {default!r}")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise SettingsError(f"{name}={raw!r}: expected a TCP port, an integer from 1 to 65535")
    return port


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, default).strip().lower()
    if value not in choices:
        raise SettingsError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = env.get(name, default).strip()
    parsed = urlparse(value)
    if parsed.scheme not in schemes or not parsed.hostname:
        raise SettingsError(f"{name}={value!r}: expected a URL like {schemes[0]}://host:port")
    try:
        parsed.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise SettingsError(f"{name}={value!r}: {exc}") from None
    return value


def _host_ports(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, default).strip()
    for part in value.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise SettingsError(f"{name}={value!r}: expected host:port[,host:port...]")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise SettingsError(f"{name}={raw!r}: expected a number from {low:g} to {high:g}")
    return value


def _size(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, default).strip().lower()
    digits = value[:-1] if value[-1:] in "kmg" else value
    if not digits.isdigit():
        raise SettingsError(f"{name}={value!r}: expected a JVM size like 512m or 1g")
    return value


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    cache_dir: Path
    log_level: str
    log_format: str

    kafka_host: str
    kafka_port: int
    kafka_controller_port: int
    kafka_bootstrap: str
    kafka_heap: str

    influx_port: int
    influx_url: str
    influx_org: str
    influx_bucket: str
    influx_token: str | None = field(repr=False)

    redis_port: int
    redis_url: str

    stream_lateness_s: float  # how long a window waits for late samples (event time)
    stream_app_id: str        # Faust app id = Kafka consumer group of the stream workers
    stream_start: str         # where a new consumer group starts: earliest or latest
    rules_path: str           # threshold rules for the stream ("" = none)

    control_port: int         # mlpe control's gRPC port
    control_address: str      # where clients reach it (host:port)

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate settings; raises SettingsError naming the bad variable."""
    env = os.environ if env is None else env
    kafka_host = _text(env, "MLPE_KAFKA_HOST", "127.0.0.1")
    kafka_port = _port(env, "MLPE_KAFKA_PORT", 9092)
    influx_port = _port(env, "MLPE_INFLUX_PORT", 8086)
    redis_port = _port(env, "MLPE_REDIS_PORT", 6379)
    control_port = _port(env, "MLPE_CONTROL_PORT", 50052)
    token = env.get("MLPE_INFLUX_TOKEN", "").strip() or None
    return Settings(
        state_dir=Path(_text(env, "MLPE_STATE_DIR", str(REPO_ROOT / ".mlpe"))).expanduser(),
        cache_dir=Path(
            _text(env, "MLPE_CACHE_DIR", str(Path.home() / ".cache" / "mlpe"))
        ).expanduser(),
        log_level=_choice(
            env, "MLPE_LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")
        ),
        log_format=_choice(env, "MLPE_LOG_FORMAT", "json", ("json", "console")),
        kafka_host=kafka_host,
        kafka_port=kafka_port,
        kafka_controller_port=_port(env, "MLPE_KAFKA_CONTROLLER_PORT", kafka_port + 1),
        kafka_bootstrap=_host_ports(env, "MLPE_KAFKA_BOOTSTRAP", f"{kafka_host}:{kafka_port}"),
        kafka_heap=_size(env, "MLPE_KAFKA_HEAP", "1g"),
        influx_port=influx_port,
        influx_url=_url(
            env, "MLPE_INFLUX_URL", f"http://127.0.0.1:{influx_port}", ("http", "https")
        ),
        influx_org=_text(env, "MLPE_INFLUX_ORG", "mlpe"),
        influx_bucket=_text(env, "MLPE_INFLUX_BUCKET", "mlpe"),
        influx_token=token,
        redis_port=redis_port,
        redis_url=_url(
            env, "MLPE_REDIS_URL", f"redis://127.0.0.1:{redis_port}/0", ("redis", "rediss")
        ),
        stream_lateness_s=_float(env, "MLPE_STREAM_LATENESS_S", 0.3, 0.0, 60.0),
        stream_app_id=_text(env, "MLPE_STREAM_APP_ID", "mlpe-stream"),
        stream_start=_choice(env, "MLPE_STREAM_START", "earliest", ("earliest", "latest")),
        rules_path=env.get("MLPE_RULES", str(REPO_ROOT / "deploy" / "rules" / "default.yaml")),
        control_port=control_port,
        control_address=_host_ports(env, "MLPE_CONTROL_ADDRESS", f"127.0.0.1:{control_port}"),
    )
