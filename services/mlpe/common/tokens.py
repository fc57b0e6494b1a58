"""The API tokens mlpe's parts share, from Settings or the state directory's secrets/.

The local stack stores InfluxDB's token there at setup; `mlpe control` makes its bearer
token there on first start. Files are mode 0600 and no token is ever printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

from mlpe.common.settings import Settings


def influx_token_file(settings: Settings) -> Path:
    return settings.secrets_dir / "influxdb.json"


def influx_token(settings: Settings) -> str | None:
    """MLPE_INFLUX_TOKEN, else the token the local stack stored at setup."""
    if settings.influx_token:
        return settings.influx_token
    try:
        return json.loads(influx_token_file(settings).read_text())["token"]
    except (OSError, ValueError, KeyError):
        return None


def write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write a secret readable by this user only; `exclusive`: FileExistsError if it is
    there already (two writers racing keep the first one's)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def control_token_file(settings: Settings) -> Path:
    return settings.secrets_dir / "control.token"


def control_token(settings: Settings, *, create: bool = False) -> str:
    """MLPE_CONTROL_TOKEN, else the stored one ("" when there is none); `create` (the
    server) makes and stores one on first use."""
    if settings.control_token:
        return settings.control_token
    path = control_token_file(settings)
    if not path.exists() and create:
        with contextlib.suppress(FileExistsError):  # another controller made it first
            write_private(path, secrets.token_urlsafe(32), exclusive=True)
    return path.read_text().strip() if path.exists() else ""
