"""InfluxDB 2.x OSS: `influxd` built once per user from its Go module, set up on first start.

The org, bucket and an all-access token are created through /api/v2/setup the
first time; the token is kept in <state dir>/secrets/influxdb.json (mode 0600) and is
never printed.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.error
import urllib.request

from mlpe.common.process import ManagedProcess, port_open
from mlpe.common.settings import Settings, environment, packaged
from mlpe.common.tokens import influx_token, influx_token_file, write_private
from mlpe.stack import retention
from mlpe.stack.component import StackError, Status, wait_until

BUILD_SCRIPT = packaged("influxdb", "build-influxd.sh")
VERSION = "v2.7.12"


def http_json(method: str, url: str, body: dict | None = None, token: str | None = None,
              timeout: float = 5.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Token {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw) if raw else {}
        except ValueError:
            return err.code, {"message": raw.decode(errors="replace")[:200]}


class InfluxDB:
    name = "influxdb"

    def __init__(self, settings: Settings):
        self.s = settings
        self.host = "127.0.0.1"
        self.port = settings.influx_port
        self.url = settings.influx_url.rstrip("/")
        self.binary = settings.cache_dir / "influxd" / VERSION / "influxd"
        self.data = settings.data_dir / "influxdb"
        self.secret_file = influx_token_file(settings)
        self.proc = ManagedProcess(self.name, settings.run_dir, settings.logs_dir)

    # -- install -----------------------------------------------------------------
    def installed(self) -> bool:
        return self.binary.exists()

    def install(self) -> None:
        if self.installed():
            return
        log = self.s.logs_dir / "influxd-build.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"influxdb: building influxd {VERSION} from its Go module "
              f"(first time only, 10-30 min; progress in {log})", flush=True)
        env = environment(MLPE_CACHE_DIR=str(self.s.cache_dir), MLPE_INFLUXD_VERSION=VERSION)
        with log.open("ab") as out:
            code = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=out,
                                  stderr=subprocess.STDOUT, env=env).returncode
        if code != 0 or not self.installed():
            raise StackError(f"influxdb: building influxd failed (exit {code}); see {log}")

    # -- run -----------------------------------------------------------------------
    def start(self) -> subprocess.Popen | None:
        if self.proc.record() is not None:
            return None
        if port_open(self.host, self.port):
            raise StackError(
                f"influxdb: port {self.port} is already in use by another process; "
                f"set MLPE_INFLUX_PORT to a free port (log: {self.proc.log})"
            )
        if not self.installed():
            raise StackError("influxdb: influxd is not built; run `mlpe stack install`")
        self.data.mkdir(parents=True, exist_ok=True)
        argv = [
            str(self.binary),
            "--bolt-path", str(self.data / "influxd.bolt"),
            "--engine-path", str(self.data / "engine"),
            "--sqlite-path", str(self.data / "influxd.sqlite"),
            "--http-bind-address", f"{self.host}:{self.port}",
            "--reporting-disabled",
            "--log-level", "warn",
        ]
        return self.proc.spawn(argv, version=VERSION)

    def _healthy(self) -> bool:
        code, body = http_json("GET", f"{self.url}/health", timeout=2)
        return code == 200 and body.get("status") == "pass"

    def wait_ready(self, proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
        wait_until(self._healthy, name=self.name, what="healthy (/health)", timeout=timeout,
                   log=self.proc.log, proc=proc)
        self.setup()

    def token(self) -> str | None:
        """The API token: MLPE_INFLUX_TOKEN if set, else the one stored at setup."""
        return influx_token(self.s)

    def setup(self) -> None:
        """Create org, bucket and token on a fresh server; check the token otherwise.
        Then the buckets per resolution and the downsampling task (retention.py)."""
        retention.ensure(self.s, http_json, self.url, self._set_up())

    def _set_up(self) -> str:
        code, body = http_json("GET", f"{self.url}/api/v2/setup")
        if code == 200 and body.get("allowed"):
            token = self.s.influx_token or secrets.token_urlsafe(32)
            code, body = http_json("POST", f"{self.url}/api/v2/setup", {
                "username": "mlpe",
                "password": secrets.token_urlsafe(18),
                "org": self.s.influx_org,
                "bucket": self.s.influx_bucket,
                "token": token,
                "retentionPeriodSeconds": self.s.influx_buckets[self.s.influx_bucket],
            })
            if code != 201:
                raise StackError(f"influxdb: setup refused ({code}: {body.get('message')})")
            write_private(self.secret_file, json.dumps(
                {"token": token, "org": self.s.influx_org, "bucket": self.s.influx_bucket}))
            return token
        token = self.token()
        if token is None:
            raise StackError(
                f"influxdb: already set up but no token in {self.secret_file} or "
                f"MLPE_INFLUX_TOKEN; remove {self.data} to start afresh"
            )
        code, _ = http_json("GET", f"{self.url}/api/v2/buckets?name={self.s.influx_bucket}",
                            token=token)
        if code != 200:
            raise StackError(f"influxdb: the stored token is refused (HTTP {code}); "
                             f"remove {self.data} and {self.secret_file} to start afresh")
        return token

    def stop(self) -> bool:
        return self.proc.stop()

    def status(self) -> Status:
        record = self.proc.record()
        try:
            code, body = http_json("GET", f"{self.url}/health", timeout=2)
        except OSError as err:
            code, body = 0, {"message": str(err)}
        if code == 200 and body.get("status") == "pass":
            detail = f"managed, pid {record['pid']}" if record else "external"
            return Status(self.name, "up", body.get("version", "unknown"), self.url, detail)
        if record:
            why = f"process {record['pid']} running but not healthy; see {self.proc.log}"
        elif not self.installed():
            why = "not built yet (run `mlpe stack install`)"
        else:
            why = "not running (start it with `mlpe stack up`)"
        return Status(self.name, "down", VERSION, self.url, why)
