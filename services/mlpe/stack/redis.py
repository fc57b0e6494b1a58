"""Redis from Debian's packages, unpacked into the per-user cache (no root needed).

`redis-server` already on PATH is used as it is; a server already answering on
the configured port is used as an external one and never stopped by `down`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from mlpe.common.process import ManagedProcess, port_open
from mlpe.common.settings import Settings, environment
from mlpe.stack.component import StackError, Status, wait_until

# redis-server's own package is only a symlink; the binary and the libraries it
# links against (but that a base image lacks) come from these.
DEBIAN_PACKAGES = ("redis-tools", "liblzf1", "libjemalloc2")
LIB_DIR = "usr/lib/x86_64-linux-gnu"


def redis_command(host: str, port: int, *args: str, timeout: float = 2.0) -> str:
    """Send one inline command and return the decoded reply (RESP, simple cases)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"$"):  # bulk string: read the announced length
            header, _, rest = data.partition(b"\r\n")
            size = int(header[1:])
            while len(rest) < size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return rest[:size].decode()
        return data.decode().strip()


class Redis:
    name = "redis"

    def __init__(self, settings: Settings):
        self.s = settings
        # Served locally on 127.0.0.1:MLPE_REDIS_PORT; status and readiness ask the
        # address clients use (MLPE_REDIS_URL), which may be another host's.
        self.host = "127.0.0.1"
        self.port = settings.redis_port
        url = urlparse(settings.redis_url)
        self.client_host, self.client_port = url.hostname, url.port or 6379
        self.root = settings.cache_dir / "redis"
        self.data = settings.data_dir / "redis"
        self.proc = ManagedProcess(self.name, settings.run_dir, settings.logs_dir)
        self.address = f"{self.client_host}:{self.client_port}"

    # -- install -----------------------------------------------------------------
    def _binary(self) -> tuple[Path, dict[str, str]] | None:
        system = shutil.which("redis-server")
        if system:
            return Path(system), {}
        for unpacked in sorted(self.root.glob("*"), reverse=True):  # newest version first
            binary = unpacked / "usr" / "bin" / "redis-server"
            if binary.exists():
                return binary, {"LD_LIBRARY_PATH": str(unpacked / LIB_DIR)}
        return None

    def installed(self) -> bool:
        return self._binary() is not None

    def install(self) -> None:
        if self.installed():
            return
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise StackError("redis: redis-server not found and apt-get/dpkg-deb unavailable; "
                             "install Redis 6+ or point MLPE_REDIS_PORT at a running server")
        print(f"redis: fetching Debian packages {', '.join(DEBIAN_PACKAGES)}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            fetched = subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES],
                                     cwd=tmp, capture_output=True, text=True)
            if fetched.returncode != 0 and os.geteuid() == 0:
                # An image without package lists: refresh them once and retry.
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                fetched = subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES],
                                         cwd=tmp, capture_output=True, text=True)
            if fetched.returncode != 0:
                last = (fetched.stderr.strip().splitlines() or ["no output"])[-1]
                raise StackError(f"redis: apt-get download failed: {last}")
            debs = sorted(Path(tmp).glob("*.deb"))
            version = next(d.name.split("_")[1] for d in debs if d.name.startswith("redis-tools"))
            version = version.replace("%3a", "-").replace(":", "-")
            target = self.root / version
            staging = Path(tmp) / "root"
            for deb in debs:
                subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
            (staging / "usr/bin/redis-server").symlink_to("redis-check-rdb")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(staging), target)

    # -- run -----------------------------------------------------------------------
    def _ping(self) -> bool:
        return redis_command(self.client_host, self.client_port, "PING") == "+PONG"

    def start(self) -> subprocess.Popen | None:
        if self.proc.record() is not None:
            return None
        if port_open(self.host, self.port):
            if self._local_ping():
                return None  # an external server answers: use it, never stop it
            raise StackError(
                f"redis: port {self.port} is in use by something that is not Redis; "
                f"set MLPE_REDIS_PORT to a free port (log: {self.proc.log})"
            )
        found = self._binary()
        if found is None:
            raise StackError("redis: not installed; run `mlpe stack install`")
        binary, extra_env = found
        self.data.mkdir(parents=True, exist_ok=True)
        argv = [
            str(binary), "--port", str(self.port), "--bind", self.host,
            "--dir", str(self.data), "--daemonize", "no", "--logfile", "",
            "--appendonly", "yes",  # job state must survive a restart
            "--save", "60 1000",
        ]
        return self.proc.spawn(argv, version=self._version(binary, extra_env),
                               env=environment(**extra_env))

    def _version(self, binary: Path, extra_env: dict[str, str]) -> str:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             env=environment(**extra_env)).stdout
        return next((w[2:] for w in out.split() if w.startswith("v=")), "unknown")

    def wait_ready(self, proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
        wait_until(self._ping, name=self.name, what="answering PING", timeout=timeout,
                   log=self.proc.log, proc=proc)

    def stop(self) -> bool:
        return self.proc.stop()

    def _local_ping(self) -> bool:
        try:
            return redis_command(self.host, self.port, "PING") == "+PONG"
        except OSError:
            return False

    def _safe_ping(self) -> bool:
        try:
            return self._ping()
        except OSError:
            return False

    def status(self) -> Status:
        record = self.proc.record()
        if self._safe_ping():
            info = redis_command(self.client_host, self.client_port, "INFO", "server")
            version = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                            if line.startswith("redis_version:")), "unknown")
            detail = f"managed, pid {record['pid']}" if record else "external"
            return Status(self.name, "up", version, self.address, detail)
        why = (f"process {record['pid']} running but not answering; see {self.proc.log}"
               if record else "not running (start it with `mlpe stack up`)")
        return Status(self.name, "down", "", self.address, why)
