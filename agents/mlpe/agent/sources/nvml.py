"""Real GPUs through NVML (nvidia-ml-py).

Per tick, one batched field-value query per GPU carries power, memory
temperature, ECC counts and the power limit. Some queries are slow on real
hardware (H100, driver 580: the energy counter 4 ms, PCIe byte counters 0.6 ms,
the maximum SM clock 1.5 ms, against ~2-30 µs for the rest), so the energy
counter is read once a second, the PCIe/NVLink byte counters ten times a second
(their rates are held in between) and the maximum clock once at start;
utilization is the driver's latest value, read once per flush.
A query the GPU does not support is found on first use and never asked again.
A GPU that stops answering becomes NaN plus a GPU_LOST event; the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable

import numpy as np

from mlpe.agent.sources.base import Device, Reading
from mlpe.common.batches import GPU_FIELDS
from mlpe.v1 import metrics_pb2 as pb

log = logging.getLogger(__name__)
F = pb.Field
COL = {number: i for i, number in enumerate(GPU_FIELDS)}
LOST_RETRY_S = 5.0
PROCESS_EVERY_S = 1.0
ENERGY_EVERY_S = 1.0     # the energy counter costs ~4 ms a query on an H100
COUNTERS_EVERY_S = 0.1   # PCIe/NVLink byte counters, ~0.6 ms a query


def nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return count > 0
    except Exception:  # noqa: BLE001 - no library, no driver, no GPU: all mean "no"
        return False


class NvmlGpus:
    name = "nvml"

    def __init__(self, hz: float, node_id: str | None = None, gpus: list[int] | None = None):
        import pynvml

        self.nv = pynvml
        self.hz = hz
        self.fields = GPU_FIELDS
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        indices = gpus if gpus is not None else list(range(count))
        bad = [i for i in indices if not 0 <= i < count]
        if bad:
            raise ValueError(f"--gpus {bad}: this node has {count} GPUs (0-{count - 1})")
        self.node_id = node_id or socket.gethostname()
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self.devices = [Device(self.node_id, pb.DEVICE_KIND_GPU, i, _text(
            pynvml.nvmlDeviceGetUUID(h))) for i, h in zip(indices, self.handles, strict=True)]
        self.n = len(self.handles)
        self.unsupported: set[str] = set()     # query names, found once
        self.field_ids = self._field_ids()
        self.lost = np.zeros(self.n, dtype=bool)
        self.lost_since = np.zeros(self.n)
        self.prev_counters: np.ndarray | None = None
        self.prev_t = 0.0
        self.prev_throttle = np.zeros(self.n, dtype=np.int64)
        self.util_last = np.full((self.n, 2), np.nan)
        self.rates_last = np.full((self.n, 4), np.nan)
        self.energy_last = np.full(self.n, np.nan)
        self.max_clock = np.array([self._max_clock(h) for h in self.handles], dtype=float)
        self.events = self._xid_events()

    # -- setup -----------------------------------------------------------------------
    def _field_ids(self) -> list[tuple[int, int]]:
        nv = self.nv
        ids = [
            (nv.NVML_FI_DEV_POWER_INSTANT, 0), (nv.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, 0),
            (nv.NVML_FI_DEV_MEMORY_TEMP, 0), (nv.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, 0),
            (nv.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, 0), (nv.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, 0),
            (nv.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, 0), (nv.NVML_FI_DEV_POWER_CURRENT_LIMIT, 0),
        ]
        links = self._links(self.handles[0]) if self.handles else []
        ids += [(nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, link) for link in links]
        ids += [(nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, link) for link in links]
        self.n_links = len(links)
        # Drop every field the first GPU answers NOT_SUPPORTED for, once.
        if self.handles:
            try:
                values = nv.nvmlDeviceGetFieldValues(self.handles[0], ids)
                supported = [fid for fid, v in zip(ids, values, strict=True)
                             if v.nvmlReturn == nv.NVML_SUCCESS]
                for fid in set(ids) - set(supported):
                    self.unsupported.add(f"field {fid[0]}")
                ids = supported
            except nv.NVMLError as err:
                log.warning("nvml: batched field values unavailable: %s", err)
                self.unsupported.add("field values")
                ids = []
        slow = {nv.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION}
        counters = {nv.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, nv.NVML_FI_DEV_PCIE_COUNT_RX_BYTES,
                    nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                    nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX}
        self.energy_ids = [f for f in ids if f[0] in slow]
        self.counter_ids = [f for f in ids if f[0] in counters]
        return [f for f in ids if f[0] not in slow | counters]

    def _max_clock(self, handle) -> float:
        try:
            return float(self.nv.nvmlDeviceGetMaxClockInfo(handle, self.nv.NVML_CLOCK_SM))
        except self.nv.NVMLError:
            return np.nan

    def _links(self, handle) -> list[int]:
        links = []
        for link in range(self.nv.NVML_NVLINK_MAX_LINKS):
            try:
                if self.nv.nvmlDeviceGetNvLinkState(handle, link):
                    links.append(link)
            except self.nv.NVMLError:
                break
        return links

    def _xid_events(self):
        nv = self.nv
        try:
            event_set = nv.nvmlEventSetCreate()
            for handle in self.handles:
                nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, event_set)
            return event_set
        except nv.NVMLError as err:
            self.unsupported.add("xid events")
            log.warning("nvml: Xid events unavailable: %s", err)
            return None

    def inventory(self) -> list[pb.GpuInfo]:
        nv, out = self.nv, []
        for device, handle in zip(self.devices, self.handles, strict=True):
            info = pb.GpuInfo(index=device.index, uuid=device.uuid)
            for attr, call in (
                ("name", lambda h: _text(nv.nvmlDeviceGetName(h))),
                ("memory_total_mib", lambda h: nv.nvmlDeviceGetMemoryInfo(h).total >> 20),
                ("pci_bus_id", lambda h: _text(nv.nvmlDeviceGetPciInfo(h).busId)),
                ("power_limit_w", lambda h: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0),
                ("sm_clock_max_mhz", lambda h: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
            ):
                with contextlib.suppress(nv.NVMLError):
                    setattr(info, attr, call(handle))
            for link in self._links(handle):
                try:
                    peer = _text(nv.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
                except nv.NVMLError:
                    peer = ""
                info.nvlinks.add(link=link, peer_pci_bus_id=peer, active=True, peer_gpu_index=-1)
            out.append(info)
        by_bus = {g.pci_bus_id.lower(): g.index for g in out}
        for g in out:
            for link in g.nvlinks:
                link.peer_gpu_index = by_bus.get(link.peer_pci_bus_id.lower(), -1)
        return out

    # -- sampling --------------------------------------------------------------------
    def _call(self, name: str, fn: Callable, *args):
        """One NVML query; NOT_SUPPORTED is remembered so it is never asked again."""
        if name in self.unsupported:
            return None
        try:
            return fn(*args)
        except self.nv.NVMLError as err:
            if err.value == self.nv.NVML_ERROR_NOT_SUPPORTED:
                self.unsupported.add(name)
                log.info("nvml: %s not supported; skipping it from now on", name)
                return None
            raise

    def read_utilization(self) -> None:
        """The driver's latest GPU and memory utilization (called once per flush).

        nvmlDeviceGetUtilizationRates takes ~2 µs on an H100; draining the sample
        buffers with nvmlDeviceGetSamples gave the same latest value for ~2.5 ms a call."""
        for i, handle in enumerate(self.handles):
            if self.lost[i]:
                continue
            try:
                rates = self._call("utilization", self.nv.nvmlDeviceGetUtilizationRates, handle)
            except self.nv.NVMLError:
                continue
            if rates is not None:
                self.util_last[i] = (rates.gpu, rates.memory)

    def read(self, k: int, t_ns: int) -> Reading:
        nv = self.nv
        out = np.full((self.n, len(self.fields)), np.nan)
        counters = np.full((self.n, 4), np.nan)  # pcie tx, rx bytes; nvlink tx, rx KiB
        events: list[tuple[int, pb.DeviceEvent]] = []
        now = time.monotonic()
        energy = k % max(1, round(self.hz * ENERGY_EVERY_S)) == 0
        count = k % max(1, round(self.hz * COUNTERS_EVERY_S)) == 0
        for i, handle in enumerate(self.handles):
            if self.lost[i] and now - self.lost_since[i] < LOST_RETRY_S:
                continue
            try:
                self._read_gpu(i, handle, out[i], counters[i], t_ns, events, energy, count)
                if self.lost[i]:
                    self.lost[i] = False
                    events.append((i, pb.DeviceEvent(time_ns=t_ns, kind=pb.EVENT_GPU_RECOVERED,
                                                     detail="GPU answers NVML again")))
            except nv.NVMLError as err:
                out[i] = np.nan
                if not self.lost[i]:
                    self.lost[i] = True
                    events.append((i, pb.DeviceEvent(
                        time_ns=t_ns, kind=pb.EVENT_GPU_LOST, code=int(err.value),
                        detail=f"GPU {self.devices[i].index} stopped answering NVML: {err}")))
                    log.error("nvml: GPU %d lost: %s", self.devices[i].index, err)
                self.lost_since[i] = now
        if count:
            self._rates(counters, now)
        for j, col in enumerate((F.GPU_PCIE_TX, F.GPU_PCIE_RX, F.GPU_NVLINK_TX, F.GPU_NVLINK_RX)):
            out[:, COL[col]] = np.where(self.lost, np.nan, self.rates_last[:, j])
        out[:, COL[F.GPU_ENERGY]] = np.where(self.lost, np.nan, self.energy_last)
        out[:, COL[F.GPU_UTIL]] = np.where(self.lost, np.nan, self.util_last[:, 0])
        out[:, COL[F.GPU_MEM_UTIL]] = np.where(self.lost, np.nan, self.util_last[:, 1])
        events += self._poll_xid(t_ns)
        if k % max(1, round(self.hz * PROCESS_EVERY_S)) == 0:
            events += self._process_memory(t_ns)
        return Reading(values=out, events=events)

    def _process_memory(self, t_ns: int) -> list[tuple[int, pb.DeviceEvent]]:
        """Device memory per compute process, where the driver reports it (once a second)."""
        nv, found = self.nv, []
        for i, handle in enumerate(self.handles):
            if self.lost[i]:
                continue
            try:
                procs = self._call("processes", nv.nvmlDeviceGetComputeRunningProcesses, handle)
            except nv.NVMLError:
                continue
            for proc in procs or ():
                used = getattr(proc, "usedGpuMemory", None)
                if used is None:  # not available (e.g. under MIG or without permission)
                    continue
                found.append((i, pb.DeviceEvent(time_ns=t_ns, kind=pb.EVENT_PROCESS_MEMORY,
                                                code=int(proc.pid), value=used / 2**20,
                                                detail=f"pid {proc.pid}: {used >> 20} MiB")))
        return found

    def _read_gpu(self, i, handle, row, counters, t_ns, events, energy=True, count=True) -> None:
        nv = self.nv
        ids = self.field_ids + (self.energy_ids if energy else []) + (
            self.counter_ids if count else [])
        if ids:
            values = nv.nvmlDeviceGetFieldValues(handle, ids)
            got = {}
            for (fid, _scope), v in zip(ids, values, strict=True):
                if v.nvmlReturn == nv.NVML_ERROR_GPU_IS_LOST:
                    raise nv.NVMLError(nv.NVML_ERROR_GPU_IS_LOST)
                if v.nvmlReturn == nv.NVML_SUCCESS:
                    got[fid] = got.get(fid, 0.0) + _value(v)
            row[COL[F.GPU_POWER]] = got.get(nv.NVML_FI_DEV_POWER_INSTANT, np.nan) / 1000.0
            if energy:
                self.energy_last[i] = got.get(nv.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
                                              np.nan) / 1000.0
            row[COL[F.GPU_MEM_TEMP]] = got.get(nv.NVML_FI_DEV_MEMORY_TEMP, np.nan)
            row[COL[F.GPU_ECC_CORRECTED]] = got.get(nv.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, np.nan)
            row[COL[F.GPU_ECC_UNCORRECTED]] = got.get(nv.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, np.nan)
            row[COL[F.GPU_POWER_LIMIT]] = got.get(nv.NVML_FI_DEV_POWER_CURRENT_LIMIT,
                                                  np.nan) / 1000.0
            if count:
                counters[:] = [got.get(nv.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, np.nan),
                               got.get(nv.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, np.nan),
                               got.get(nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, np.nan),
                               got.get(nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, np.nan)]
        memory = self._call("memory", nv.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            row[COL[F.GPU_MEM_USED]] = memory.used / 2**20
            row[COL[F.GPU_MEM_TOTAL]] = memory.total / 2**20
        for col, name, fn, args in (
            (F.GPU_TEMP, "temperature", nv.nvmlDeviceGetTemperature, (nv.NVML_TEMPERATURE_GPU,)),
            (F.GPU_SM_CLOCK, "sm clock", nv.nvmlDeviceGetClockInfo, (nv.NVML_CLOCK_SM,)),
            (F.GPU_MEM_CLOCK, "memory clock", nv.nvmlDeviceGetClockInfo, (nv.NVML_CLOCK_MEM,)),
        ):
            value = self._call(name, fn, handle, *args)
            if value is not None:
                row[COL[col]] = value
        row[COL[F.GPU_SM_CLOCK_MAX]] = self.max_clock[i]  # fixed per GPU: read at start
        throttle = self._call("throttle reasons", nv.nvmlDeviceGetCurrentClocksEventReasons,
                              handle)
        if throttle is not None:
            row[COL[F.GPU_THROTTLE_REASONS]] = throttle
            if throttle != self.prev_throttle[i]:
                events.append((i, pb.DeviceEvent(time_ns=t_ns, kind=pb.EVENT_THROTTLE,
                                                 code=int(throttle),
                                                 detail=f"throttle reasons now {throttle:#x}")))
                self.prev_throttle[i] = throttle

    def _rates(self, counters: np.ndarray, now: float) -> None:
        """Byte counters -> MB/s since they were last read (held until the next read)."""
        if self.prev_counters is not None and now > self.prev_t:
            delta = (counters - self.prev_counters) / (now - self.prev_t)
            delta[:, 2:] *= 1024  # NVLink counters are KiB
            self.rates_last = np.where(delta < 0, np.nan, delta) / 1e6
        self.prev_counters, self.prev_t = counters, now

    def _poll_xid(self, t_ns: int) -> list[tuple[int, pb.DeviceEvent]]:
        nv, found = self.nv, []
        while self.events is not None:
            try:
                data = nv.nvmlEventSetWait_v2(self.events, 0)
            except nv.NVMLError:
                break  # timeout: nothing pending
            row = next((i for i, h in enumerate(self.handles)
                        if _text(nv.nvmlDeviceGetUUID(data.device)) == self.devices[i].uuid), 0)
            found.append((row, pb.DeviceEvent(time_ns=t_ns, kind=pb.EVENT_XID,
                                              code=int(data.eventData),
                                              detail=f"Xid {int(data.eventData)}")))
        return found

    def close(self) -> None:
        try:
            if self.events is not None:
                self.nv.nvmlEventSetFree(self.events)
            self.nv.nvmlShutdown()
        except self.nv.NVMLError:
            pass


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _value(v) -> float:
    t = v.valueType
    if t == 0:
        return float(v.value.dVal)
    if t == 1:
        return float(v.value.uiVal)
    if t in (2,):
        return float(v.value.ulVal)
    if t == 4:
        return float(v.value.sllVal)
    if t == 5:
        return float(v.value.siVal)
    if t == 6:
        return float(v.value.usVal)
    return float(v.value.ullVal)
