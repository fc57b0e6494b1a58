"""The NVML source's error paths, with nvidia-ml-py replaced by a small fake driver.

(A real run needs a GPU: see the GPU test and `mlpe bench agent --source nvml`.)
"""

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from mlpe.agent.sources.nvml import COL, NvmlGpus
from mlpe.v1 import metrics_pb2 as pb


class FakeError(Exception):
    def __init__(self, value):
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNvml:
    """Two GPUs; tests flip `unsupported`, `lost` and `xids` to provoke each path."""
    NVMLError = FakeError
    NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_GPU_IS_LOST = 0, 3, 15
    NVML_FI_DEV_POWER_INSTANT, NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION = 186, 83
    NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_PCIE_COUNT_TX_BYTES = 82, 197
    NVML_FI_DEV_PCIE_COUNT_RX_BYTES, NVML_FI_DEV_ECC_SBE_VOL_TOTAL = 198, 3
    NVML_FI_DEV_ECC_DBE_VOL_TOTAL, NVML_FI_DEV_POWER_CURRENT_LIMIT = 4, 190
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 138, 139
    NVML_NVLINK_MAX_LINKS, NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM = 4, 0, 1, 2
    nvmlEventTypeXidCriticalError = 8

    def __init__(self):
        self.unsupported: set[str] = {"memory temp field"}
        self.lost: set[int] = set()
        self.xids: list[tuple[int, int]] = []
        self.calls: dict[str, int] = {}

    def _count(self, name, gpu=None):
        self.calls[name] = self.calls.get(name, 0) + 1
        if gpu in self.lost:
            raise FakeError(self.NVML_ERROR_GPU_IS_LOST)
        if name in self.unsupported:
            raise FakeError(self.NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return 2
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetUUID(self, h): return f"GPU-fake-{h}"
    def nvmlDeviceGetNvLinkState(self, h, link): return 1 if link < 2 else 0
    def nvmlEventSetCreate(self): return "events"
    def nvmlDeviceRegisterEvents(self, h, kind, s): pass
    def nvmlEventSetFree(self, s): pass

    def nvmlEventSetWait_v2(self, s, timeout):
        if not self.xids:
            raise FakeError(10)  # NVML_ERROR_TIMEOUT
        gpu, code = self.xids.pop(0)
        return SimpleNamespace(device=gpu, eventData=code)

    def nvmlDeviceGetFieldValues(self, h, ids):
        self._count("field values", h)
        out = []
        for fid, _scope in ids:
            bad = fid == self.NVML_FI_DEV_MEMORY_TEMP and "memory temp field" in self.unsupported
            out.append(SimpleNamespace(nvmlReturn=3 if bad else 0, valueType=1,
                                       value=SimpleNamespace(uiVal=1000 * (fid + h))))
        return out

    def nvmlDeviceGetMemoryInfo(self, h):
        self._count("memory", h)
        return SimpleNamespace(used=40 << 30, total=80 << 30)

    def nvmlDeviceGetTemperature(self, h, kind):
        self._count("temperature", h)
        return 60 + h

    def nvmlDeviceGetClockInfo(self, h, kind):
        self._count("clock", h)
        return 1980

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        self._count("max clock", h)
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        self._count("throttle", h)
        return 0

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self._count("processes", h)
        return [SimpleNamespace(pid=4242 + h, usedGpuMemory=(3 + h) << 30),
                SimpleNamespace(pid=7, usedGpuMemory=None)]  # not reported: skipped

    def nvmlDeviceGetUtilizationRates(self, h):
        self._count("utilization", h)
        return SimpleNamespace(gpu=90, memory=45)


@pytest.fixture
def fake(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


def test_reads_values_and_skips_unsupported_field_once(fake):
    gpus = NvmlGpus(hz=100, node_id="n1")
    assert [d.uuid for d in gpus.devices] == ["GPU-fake-0", "GPU-fake-1"]
    assert all(fid != fake.NVML_FI_DEV_MEMORY_TEMP for fid, _ in gpus.field_ids)
    gpus.read_utilization()
    r = gpus.read(0, 0)
    assert r.values[0, COL[pb.GPU_POWER]] == pytest.approx(186.0)   # mW -> W
    assert r.values[1, COL[pb.GPU_TEMP]] == 61
    assert r.values[0, COL[pb.GPU_MEM_USED]] == 40 * 1024
    assert r.values[0, COL[pb.GPU_UTIL]] == 90
    assert np.isnan(r.values[:, COL[pb.GPU_MEM_TEMP]]).all()


def test_not_supported_query_is_asked_once(fake):
    fake.unsupported.add("temperature")
    gpus = NvmlGpus(hz=100)
    for k in range(5):
        r = gpus.read(k, k)
    assert fake.calls["temperature"] == 1
    assert np.isnan(r.values[:, COL[pb.GPU_TEMP]]).all()
    assert (r.values[:, COL[pb.GPU_SM_CLOCK]] == 1980).all()  # the rest still flows


def test_lost_gpu_is_an_event_and_the_others_go_on(fake):
    gpus = NvmlGpus(hz=100)
    gpus.read(0, 0)
    fake.lost.add(1)
    r1 = gpus.read(1, 1)
    r2 = gpus.read(2, 2)
    assert [(row, e.kind) for row, e in r1.events] == [(1, pb.EVENT_GPU_LOST)]
    assert r2.events == []  # reported once, not every tick
    assert np.isnan(r2.values[1]).all()
    assert r2.values[0, COL[pb.GPU_TEMP]] == 60
    calls = fake.calls["field values"]
    gpus.read(3, 3)
    assert fake.calls["field values"] == calls + 1  # the lost GPU waits before a retry
    fake.lost.clear()
    gpus.lost_since[1] = -1e9  # pretend the retry interval passed
    r4 = gpus.read(4, 4)
    assert [(row, e.kind) for row, e in r4.events] == [(1, pb.EVENT_GPU_RECOVERED)]


def test_xid_events(fake):
    gpus = NvmlGpus(hz=100)
    fake.xids = [(1, 79), (0, 48)]
    r = gpus.read(0, 123)
    assert [(row, e.kind, e.code) for row, e in r.events if e.kind == pb.EVENT_XID] == [
        (1, pb.EVENT_XID, 79), (0, pb.EVENT_XID, 48)]


def test_process_memory_once_a_second(fake):
    gpus = NvmlGpus(hz=100)
    first = [(row, e.code, e.value) for row, e in gpus.read(0, 0).events
             if e.kind == pb.EVENT_PROCESS_MEMORY]
    assert first == [(0, 4242, 3 * 1024), (1, 4243, 4 * 1024)]
    assert not any(e.kind == pb.EVENT_PROCESS_MEMORY for _, e in gpus.read(1, 1).events)
    assert fake.calls["processes"] == 2


def test_bad_gpu_index(fake):
    with pytest.raises(ValueError, match="this node has 2 GPUs"):
        NvmlGpus(hz=100, gpus=[0, 5])


def test_slow_queries_are_read_less_often_and_held(fake, monkeypatch):
    """Energy once a second, byte counters ten times a second, max clock once: on an H100
    these cost 4 ms, 0.6 ms and 1.5 ms a query against microseconds for the rest."""
    asked: list[set[int]] = []
    fields = fake.nvmlDeviceGetFieldValues

    def recording(h, ids):
        if h == 0:
            asked.append({fid for fid, _ in ids})
        return fields(h, ids)

    monkeypatch.setattr(fake, "nvmlDeviceGetFieldValues", recording)
    gpus = NvmlGpus(hz=100, node_id="n1")
    max_clock_calls = fake.calls.get("max clock", 0)
    asked.clear()
    reads = [gpus.read(k, k) for k in range(200)]
    energy = fake.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION
    assert [k for k, ids in enumerate(asked) if energy in ids] == [0, 100]
    assert [k for k, ids in enumerate(asked) if fake.NVML_FI_DEV_PCIE_COUNT_TX_BYTES in ids] \
        == list(range(0, 200, 10))
    assert fake.calls.get("max clock", 0) == max_clock_calls       # never per tick
    assert all(r.values[0, COL[pb.GPU_SM_CLOCK_MAX]] == 1980 for r in reads)
    assert all(r.values[0, COL[pb.GPU_ENERGY]] == pytest.approx(83.0) for r in reads)  # held
    # The fake's counters never move: a rate of 0 MB/s once two reads exist, held between.
    assert all(r.values[0, COL[pb.GPU_PCIE_TX]] == 0.0 for r in reads[10:])
