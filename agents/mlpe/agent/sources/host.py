"""The node itself: CPU, memory, disk and network I/O (psutil), as rates per second."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import psutil

from mlpe.agent.sources.base import Device, Reading
from mlpe.common.batches import HOST_FIELDS
from mlpe.v1 import metrics_pb2 as pb

F = pb.Field
COL = {number: i for i, number in enumerate(HOST_FIELDS)}


class HostMetrics:
    name = "host"

    def __init__(self, node_id: str | None = None):
        self.fields = HOST_FIELDS
        self.devices = [Device(node_id or socket.gethostname(), pb.DEVICE_KIND_HOST, 0)]
        psutil.cpu_percent()  # primes the CPU counter: the next call measures an interval
        self.prev = self._counters()
        self.prev_t = time.monotonic()

    @staticmethod
    def _counters() -> np.ndarray:
        disk = psutil.disk_io_counters()
        nics = psutil.net_io_counters(pernic=True)
        rx = sum(c.bytes_recv for name, c in nics.items() if name != "lo")
        tx = sum(c.bytes_sent for name, c in nics.items() if name != "lo")
        return np.array([disk.read_bytes if disk else 0, disk.write_bytes if disk else 0, rx, tx],
                        dtype=np.float64)

    def read(self, k: int, t_ns: int) -> Reading:
        now = time.monotonic()
        counters = self._counters()
        rates = (counters - self.prev) / max(now - self.prev_t, 1e-6) / 1e6  # MB/s
        self.prev, self.prev_t = counters, now
        memory = psutil.virtual_memory()
        row = np.empty(len(self.fields))
        row[COL[F.HOST_CPU_UTIL]] = psutil.cpu_percent()
        row[COL[F.HOST_MEM_USED]] = (memory.total - memory.available) / 2**20
        row[COL[F.HOST_MEM_TOTAL]] = memory.total / 2**20
        row[COL[F.HOST_DISK_READ]] = rates[0]
        row[COL[F.HOST_DISK_WRITE]] = rates[1]
        row[COL[F.HOST_NET_RX]] = rates[2]
        row[COL[F.HOST_NET_TX]] = rates[3]
        row[COL[F.HOST_LOAD1]] = os.getloadavg()[0]
        return Reading(values=row[None, :])
