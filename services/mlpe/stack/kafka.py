"""Apache Kafka, single node in KRaft combined mode, from Maven Central jars.

deploy/kafka/pom.xml (packaged as mlpe.deploy) names the broker; Maven copies it and
its runtime dependencies into the per-user cache, keyed by the pom's hash, once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from mlpe.common.kafka import create_topics, describe_cluster, kafka_reachable
from mlpe.common.process import ManagedProcess, port_open
from mlpe.common.settings import Settings, packaged
from mlpe.common.topics import configured
from mlpe.stack.component import StackError, Status, wait_until

POM = packaged("kafka", "pom.xml")
LOG4J2 = packaged("kafka", "log4j2.xml")
MIN_JAVA = 17
# The broker's lines per partition log at start: loaded from disk, then led.
LOADED = (b"Completed load of Log(", b"Log loaded for partition")
START_LIMIT_S = 900.0


class LinesSeen:
    """How many lines containing one of `markers` a growing log has gained since this was
    made."""

    def __init__(self, log: Path, markers: tuple[bytes, ...]):
        self.log, self.markers, self.seen = log, markers, 0
        self.offset = log.stat().st_size if log.exists() else 0

    def count(self) -> int:
        try:
            with self.log.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:
                    self.offset = 0  # rotated since: a new file
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return self.seen
        whole = chunk[: chunk.rfind(b"\n") + 1]  # a half-written line waits for its end
        self.offset += len(whole)
        self.seen += sum(whole.count(marker) for marker in self.markers)
        return self.seen


def kafka_version() -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    return ET.parse(POM).getroot().findtext("m:properties/m:kafka.version", namespaces=ns)


class Kafka:
    name = "kafka"

    def __init__(self, settings: Settings):
        self.s = settings
        self.version = kafka_version()
        pom_hash = hashlib.sha256(POM.read_bytes()).hexdigest()[:10]
        self.libs = settings.cache_dir / "kafka" / f"{self.version}-{pom_hash}" / "libs"
        self.config_dir = settings.state_dir / "kafka"
        self.data = settings.data_dir / "kafka"
        self.config = self.config_dir / "server.properties"
        self.proc = ManagedProcess(self.name, settings.run_dir, settings.logs_dir)
        self.address = settings.kafka_bootstrap

    # -- install -----------------------------------------------------------------
    def installed(self) -> bool:
        return any(self.libs.glob("kafka_2.13-*.jar"))

    def install(self) -> None:
        if self.installed():
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError("kafka: Maven ('mvn') not found on PATH; it fetches the broker jars")
        tmp = self.libs.with_name("libs.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"kafka: fetching broker {self.version} jars into {self.libs.parent}", flush=True)
        result = subprocess.run(
            [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
            raise StackError(f"kafka: Maven could not fetch the broker jars: {tail[0]}")
        tmp.replace(self.libs)

    # -- run -----------------------------------------------------------------------
    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise StackError(f"kafka: Java {MIN_JAVA}+ not found on PATH; install OpenJDK 17 "
                             f"(log: {self.proc.log})")
        out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
        match = re.search(r'version "(\d+)', out)
        if not match or int(match.group(1)) < MIN_JAVA:
            first = out.splitlines()[0] if out else "no version"
            raise StackError(f"kafka: needs Java {MIN_JAVA}+, found {first!r} "
                             f"(log: {self.proc.log})")
        return java

    def _write_config(self) -> Path:
        s = self.s
        self.config_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{s.kafka_controller_port}",
            "listeners": f"PLAINTEXT://{s.kafka_host}:{s.kafka_port},"
            f"CONTROLLER://127.0.0.1:{s.kafka_controller_port}",
            "advertised.listeners": f"PLAINTEXT://{s.kafka_host}:{s.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data),
            "num.partitions": "1",
            # One broker: every internal topic has a single replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",  # Faust's internal topics
            "log.retention.hours": "24",
            "log.retention.check.interval.ms": "60000",
            # Loading partition logs at start is the slow part of a restart; use every core.
            "num.recovery.threads.per.data.dir": str(os.cpu_count() or 1),
        }
        self.config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return self.config

    def _classpath(self) -> str:
        return str(self.libs / "*")

    def _format_storage(self, java: str, config: Path) -> None:
        if (self.data / "meta.properties").exists():
            return
        self.data.mkdir(parents=True, exist_ok=True)
        cp = ["-cp", self._classpath(), f"-Dlog4j2.configurationFile={LOG4J2}"]
        cluster_id = subprocess.run(
            [java, *cp, "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        result = subprocess.run(
            [java, *cp, "kafka.tools.StorageTool", "format", "-t", cluster_id,
             "-c", str(config), "--standalone", "-g"],
            capture_output=True, text=True,
        )
        with self.proc.log.open("a") as log:
            log.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise StackError(f"kafka: formatting storage failed; see {self.proc.log}")

    def start(self) -> subprocess.Popen | None:
        if self.proc.record() is not None:
            return None
        if port_open(self.s.kafka_host, self.s.kafka_port):
            raise StackError(
                f"kafka: port {self.s.kafka_port} is already in use by another process; "
                f"set MLPE_KAFKA_PORT to a free port (log: {self.proc.log})"
            )
        if port_open("127.0.0.1", self.s.kafka_controller_port):
            raise StackError(
                f"kafka: controller port {self.s.kafka_controller_port} is already in use; "
                f"set MLPE_KAFKA_CONTROLLER_PORT to a free port (log: {self.proc.log})"
            )
        java = self._java()
        config = self._write_config()
        self.proc.log.parent.mkdir(parents=True, exist_ok=True)
        self._format_storage(java, config)
        heap = self.s.kafka_heap
        argv = [
            java, f"-Xmx{heap}", f"-Xms{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={LOG4J2}",
            f"-Dkafka.logs.dir={self.s.logs_dir}",
            "-cp", self._classpath(), "kafka.Kafka", str(config),
        ]
        self._loaded = LinesSeen(self.proc.log, LOADED)
        return self.proc.spawn(argv, version=self.version)

    def wait_ready(self, proc: subprocess.Popen | None, timeout: float = 120.0) -> None:
        """Until the broker answers; while it is still loading partition logs (thousands
        after many runs) the wait goes on, up to START_LIMIT_S."""
        loaded = getattr(self, "_loaded", None)
        wait_until(
            lambda: port_open(self.s.kafka_host, self.s.kafka_port) and self._metadata_ok(),
            name=self.name, what="answering metadata requests", timeout=timeout,
            log=self.proc.log, proc=proc, limit=START_LIMIT_S,
            progress=loaded.count if loaded else None,
            report=lambda line: print(line.replace("so far", "partition-log steps so far"),
                                      flush=True),
        )
        self.create_topics()

    def _metadata_ok(self) -> bool:
        return asyncio.run(describe_cluster(self.s.kafka_bootstrap)) is not None

    def reachable(self) -> bool:
        return kafka_reachable(self.s.kafka_bootstrap)

    def create_topics(self) -> list[str]:
        """Create mlpe's topics that are missing; returns the names created."""
        return asyncio.run(create_topics(self.s.kafka_bootstrap, configured(self.s)))

    def stop(self) -> bool:
        return self.proc.stop(timeout=60.0)

    def status(self) -> Status:
        record = self.proc.record()
        reachable = self.reachable()
        if reachable:
            detail = f"managed, pid {record['pid']}" if record else "external"
            version = record["version"] if record else "unknown"
            return Status(self.name, "up", version, self.address, detail)
        why = (
            f"process {record['pid']} running but not answering; see {self.proc.log}"
            if record else "not running (start it with `mlpe stack up`)"
        )
        return Status(self.name, "down", self.version, self.address, why)
