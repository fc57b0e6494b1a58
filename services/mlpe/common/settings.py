"""Every setting mlpe reads, from environment variables with defaults.

One place, so a typo'd or malformed variable is caught at start with an error
that names the variable and the form it expects. docker-compose.yml, the Kubernetes
manifests and the local stack use the same names. Nothing here runs at import time:
`load()` reads the environment when a command starts, and a test passes its own mapping.

The only other environment reads in mlpe are the worker's launch variables (RANK,
WORLD_SIZE, LOCAL_RANK, which torchrun sets) and the kernel package's own switches
(MLPE_KERNELS, MLPE_KERNEL_PROFILE: mlpe.kernels depends on nothing of mlpe).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlparse

from mlpe.common.gpus import GPU_TYPES, canonical


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


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise SettingsError(f"{name}={raw!r}: expected a whole number from {low} to {high}")
    return value


def _secret_url(env: Mapping[str, str], *names: str) -> str | None:
    """The first of `names` that is set, checked for form; the value is never shown."""
    for name in names:
        value = env.get(name, "").strip()
        if not value:
            continue
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise SettingsError(f"{name}: expected an http(s) URL (value not shown: a secret)")
        return value
    return None


def _optional_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name, "").strip()
    return Path(value).expanduser() if value else None


def _roots(env: Mapping[str, str], name: str, default: str) -> tuple[Path, ...]:
    value = env.get(name, default).strip()
    roots = tuple(Path(part).expanduser() for part in value.split(os.pathsep) if part.strip())
    for root in roots:
        if not root.is_absolute():
            raise SettingsError(f"{name}: {str(root)!r} is not an absolute path")
    return roots


def _gpu_type(env: Mapping[str, str], name: str) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return ""
    gpu = canonical(raw)
    if gpu is None:
        raise SettingsError(f"{name}={raw!r}: expected a GPU type, one of {', '.join(GPU_TYPES)}")
    return gpu


def _size(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, default).strip().lower()
    digits = value[:-1] if value[-1:] in "kmg" else value
    if not digits.isdigit():
        raise SettingsError(f"{name}={value!r}: expected a JVM size like 512m or 1g")
    return value


_DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def _duration(env: Mapping[str, str], name: str, default: str) -> int:
    """A retention like 1d, 30d or 365d, in seconds; 0 keeps for ever."""
    value = env.get(name, default).strip().lower()
    number, unit = value[:-1], value[-1:]
    if value == "0":
        return 0
    if not number.isdigit() or unit not in _DURATION_UNITS_S or \
            int(number) * _DURATION_UNITS_S[unit] < 3600:
        raise SettingsError(f"{name}={value!r}: expected a duration of at least 1h like 1d, "
                            "30d or 365d (a whole number, then s, m, h, d or w), or 0 for "
                            "ever")
    return int(number) * _DURATION_UNITS_S[unit]


# The stream's resolutions (the window tag of its points) and where each is kept.
RESOLUTIONS = ("1s", "10s", "1m")


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
    # Seconds each resolution's bucket keeps its points (0: for ever); the base bucket
    # (alerts, kernel timings) keeps them as long as the 1 min one.
    influx_retention_s: dict[str, int]

    redis_port: int
    redis_url: str

    stream_lateness_s: float  # how long a window waits for late samples (event time)
    # A batch stamped further ahead of the worker's clock is refused (dead letter + alert):
    # a node whose clock jumped must not close other windows, nor its own, early.
    stream_clock_tolerance_s: float
    stream_max_devices: int   # devices in one metric batch (one node's GPUs)
    stream_max_samples: int   # samples per device in one metric batch
    stream_max_world_size: int  # TrainStep world_size (ranks of one job)
    stream_fetch_records: int   # metric messages the stream takes from Kafka at once
    gpu_metrics_partitions: int   # of mlpe.metrics.gpu: the most stream workers it feeds
    host_metrics_partitions: int  # of mlpe.metrics.host
    stream_app_id: str        # Faust app id = Kafka consumer group of the stream workers
    stream_start: str         # where a new consumer group starts: earliest or latest
    rules_path: str           # threshold rules for the stream ("" = none)
    prices_path: Path         # GPU prices per GPU-hour (mlpe.common.prices)

    control_port: int         # mlpe control's gRPC port
    control_address: str      # where clients reach it (host:port)
    control_namespace: str    # prefix of the controller's Redis keys (workers inherit it)
    control_token: str | None = field(repr=False)  # bearer token; None: the stored one
    control_tls_cert: Path | None  # server certificate and key (both or neither)
    control_tls_key: Path | None
    control_tls_ca: Path | None    # clients: CA that signed the server's certificate

    control_script_roots: tuple[Path, ...]  # script jobs may only run code under these
    control_gpu_type: str     # the GPU type jobs are priced at ("" = the GPU NVML finds)
    pricing: str              # on_demand or spot: the price jobs and the fleet cost at
    idle_util_pct: float      # a GPU 10 s window under this mean utilization is idle
    budgets_path: Path | None  # budgets per job label for mlpe control (None = none)
    optimizer_port: int       # mlpe optimizer's gRPC port

    notify_routes: str        # routes YAML ("" = everything to the default route)
    notify_group_id: str      # Kafka consumer group of the notifiers
    notify_start: str         # where a new notifier group starts: earliest or latest
    notify_redis_prefix: str  # prefix of the notifier's Redis keys (dedup, groups)
    slack_webhook_url: str | None = field(repr=False)  # the default route's webhook

    job_id: str               # agent: the training job this node's GPUs belong to;
                              # mlpe.sdk: the job this rank is part of (set by the launcher)
    job_dir: Path | None      # mlpe.sdk: the job's folder (spec, checkpoints); None = unmanaged
    worker_fault: str         # worker: fault injection for tests, hang@STEP[:RANK]
    # Variables a routes file names for its webhooks; read through `secret()`.
    environment: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)

    def influx_bucket_of(self, window: str) -> str:
        """The bucket of a resolution ("1s", "10s", "1m"): <base>-<window>; anything else
        (alerts, kernel timings: no window) is in the base bucket."""
        return f"{self.influx_bucket}-{window}" if window in RESOLUTIONS else self.influx_bucket

    @property
    def influx_buckets(self) -> dict[str, int]:
        """Every bucket mlpe writes, with its retention in seconds."""
        return {self.influx_bucket: self.influx_retention_s["1m"],
                **{self.influx_bucket_of(r): self.influx_retention_s[r] for r in RESOLUTIONS}}

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

    def secret(self, name: str) -> str | None:
        """A secret named by a config file (a route's webhook variable); never logged."""
        if name == "MLPE_SLACK_WEBHOOK_URL":
            return self.slack_webhook_url
        return self.environment.get(name, "").strip() or None


def default_state_dir(env: Mapping[str, str]) -> Path:
    """Per user, as XDG says, like the stack's ports are per machine: every clone and
    every shell of a user finds the same running stack."""
    base = env.get("XDG_STATE_HOME", "").strip() or str(Path.home() / ".local" / "state")
    return Path(base) / "mlpe"


def packaged(*parts: str) -> Path:
    """A data file shipped with mlpe from deploy/ (the wheel carries a copy under
    mlpe/deploy: see pyproject.toml), e.g. packaged("rules", "default.yaml")."""
    path = files("mlpe.deploy")  # a namespace package: one part at a time (Python 3.11)
    for part in parts:
        path = path / part
    return Path(str(path))


def environment(**overrides: str) -> dict[str, str]:
    """This process's environment plus `overrides`, for a child process (a service, a
    torchrun rank, a build): settings travel to children as the same variables."""
    return {**os.environ, **overrides}


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate settings; raises SettingsError naming the bad variable."""
    env = os.environ if env is None else env
    kafka_host = _text(env, "MLPE_KAFKA_HOST", "127.0.0.1")
    kafka_port = _port(env, "MLPE_KAFKA_PORT", 9092)
    influx_port = _port(env, "MLPE_INFLUX_PORT", 8086)
    redis_port = _port(env, "MLPE_REDIS_PORT", 6379)
    control_port = _port(env, "MLPE_CONTROL_PORT", 50052)
    token = env.get("MLPE_INFLUX_TOKEN", "").strip() or None
    cert = _optional_path(env, "MLPE_CONTROL_TLS_CERT")
    key = _optional_path(env, "MLPE_CONTROL_TLS_KEY")
    if (cert is None) != (key is None):
        raise SettingsError("MLPE_CONTROL_TLS_CERT and MLPE_CONTROL_TLS_KEY go together: "
                            "set both or neither")
    rules = env.get("MLPE_RULES")
    return Settings(
        state_dir=Path(_text(env, "MLPE_STATE_DIR", str(default_state_dir(env)))).expanduser(),
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
        influx_retention_s={
            res: _duration(env, f"MLPE_INFLUX_RETENTION_{res.upper()}", default)
            for res, default in zip(RESOLUTIONS, ("1d", "30d", "365d"), strict=True)},
        redis_port=redis_port,
        redis_url=_url(
            env, "MLPE_REDIS_URL", f"redis://127.0.0.1:{redis_port}/0", ("redis", "rediss")
        ),
        stream_lateness_s=_float(env, "MLPE_STREAM_LATENESS_S", 0.0, 0.0, 60.0),
        stream_clock_tolerance_s=_float(env, "MLPE_STREAM_CLOCK_TOLERANCE_S", 10.0, 0.0,
                                        3600.0),
        stream_max_devices=_int(env, "MLPE_STREAM_MAX_DEVICES", 64, 1, 4096),
        stream_max_samples=_int(env, "MLPE_STREAM_MAX_SAMPLES", 6000, 1, 1_000_000),
        stream_max_world_size=_int(env, "MLPE_STREAM_MAX_WORLD_SIZE", 65536, 1, 1 << 24),
        stream_fetch_records=_int(env, "MLPE_STREAM_FETCH_RECORDS", 2000, 1, 100_000),
        gpu_metrics_partitions=_int(env, "MLPE_GPU_METRICS_PARTITIONS", 24, 1, 1024),
        host_metrics_partitions=_int(env, "MLPE_HOST_METRICS_PARTITIONS", 4, 1, 1024),
        stream_app_id=_text(env, "MLPE_STREAM_APP_ID", "mlpe-stream"),
        stream_start=_choice(env, "MLPE_STREAM_START", "earliest", ("earliest", "latest")),
        rules_path=str(packaged("rules", "default.yaml")) if rules is None else rules.strip(),
        prices_path=_optional_path(env, "MLPE_PRICES") or packaged("prices", "default.yaml"),
        control_port=control_port,
        control_address=_host_ports(env, "MLPE_CONTROL_ADDRESS", f"127.0.0.1:{control_port}"),
        control_namespace=_text(env, "MLPE_CONTROL_NAMESPACE", "mlpe"),
        control_token=env.get("MLPE_CONTROL_TOKEN", "").strip() or None,
        control_tls_cert=cert,
        control_tls_key=key,
        control_tls_ca=_optional_path(env, "MLPE_CONTROL_TLS_CA"),
        control_script_roots=_roots(env, "MLPE_CONTROL_SCRIPT_ROOTS", str(Path.home())),
        control_gpu_type=_gpu_type(env, "MLPE_CONTROL_GPU_TYPE"),
        pricing=_choice(env, "MLPE_PRICING", "on_demand", ("on_demand", "spot")),
        idle_util_pct=_float(env, "MLPE_IDLE_UTIL_PCT", 5.0, 0.0, 100.0),
        budgets_path=_optional_path(env, "MLPE_BUDGETS"),
        optimizer_port=_port(env, "MLPE_OPTIMIZER_PORT", 50051),
        notify_routes=env.get("MLPE_NOTIFY_ROUTES", "").strip(),
        notify_group_id=_text(env, "MLPE_NOTIFY_GROUP_ID", "mlpe-notify"),
        notify_start=_choice(env, "MLPE_NOTIFY_START", "earliest", ("earliest", "latest")),
        notify_redis_prefix=_text(env, "MLPE_NOTIFY_REDIS_PREFIX", "mlpe:notify"),
        slack_webhook_url=_secret_url(env, "MLPE_SLACK_WEBHOOK_URL", "SLACK_WEBHOOK_URL"),
        job_id=env.get("MLPE_JOB_ID", "").strip(),
        worker_fault=env.get("MLPE_WORKER_FAULT", "").strip(),
        job_dir=_optional_path(env, "MLPE_JOB_DIR"),
        environment=dict(env),
    )
