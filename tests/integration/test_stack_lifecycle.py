"""`mlpe stack` on its own ports and state folder: up, up again, down, status, external."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import isolated_stack_env, mlpe


@pytest.fixture
def isolated_env(tmp_path, stack_endpoints):
    """A second stack beside the session's (whose cache it reuses), on free ports."""
    env = isolated_stack_env(tmp_path / "state")
    yield env
    stack(env, "down")


def stack(env, *args):
    return mlpe("stack", *args, env=env, timeout=300)


def statuses(env) -> dict[str, dict]:
    out = stack(env, "status", "--json")
    return {s["name"]: s for s in json.loads(out.stdout)}


def test_up_twice_then_down(isolated_env):
    first = stack(isolated_env, "up")
    assert first.returncode == 0, first.stderr
    state = Path(isolated_env["MLPE_STATE_DIR"])
    token = json.loads((state / "secrets" / "influxdb.json").read_text())["token"]
    assert (state / "secrets" / "influxdb.json").stat().st_mode & 0o077 == 0
    logs = "".join(log.read_text(errors="replace") for log in (state / "logs").glob("*.log"))
    assert token not in first.stdout + first.stderr + logs
    up = statuses(isolated_env)
    assert {s["state"] for s in up.values()} == {"up"}
    assert all(s["detail"].startswith("managed, pid ") for s in up.values())
    assert up["kafka"]["address"].endswith(isolated_env["MLPE_KAFKA_PORT"])

    second = stack(isolated_env, "up")
    assert second.returncode == 0, second.stderr
    assert statuses(isolated_env) == up  # same processes: the second `up` changed nothing

    one_down = stack(isolated_env, "down", "--only", "redis")
    assert one_down.stdout.strip() == "redis: stopped"
    partial = stack(isolated_env, "status")
    assert partial.returncode == 3
    redis_line = next(line for line in partial.stdout.splitlines() if line.startswith("redis"))
    assert "down" in redis_line and "not running" in redis_line

    all_down = stack(isolated_env, "down")
    assert all_down.returncode == 0
    assert {s["state"] for s in statuses(isolated_env).values()} == {"down"}


def test_external_redis_is_used_and_left_alone(isolated_env, tmp_path):
    owner = {**isolated_env, "MLPE_STATE_DIR": str(tmp_path / "owner")}
    assert stack(owner, "up", "--only", "redis").returncode == 0
    try:
        guest = stack(isolated_env, "up", "--only", "redis")
        assert guest.returncode == 0, guest.stderr
        assert "external" in guest.stdout
        left = stack(isolated_env, "down", "--only", "redis")
        assert "left alone" in left.stdout
        assert statuses(owner)["redis"]["state"] == "up"
    finally:
        stack(owner, "down", "--only", "redis")
