"""A real NVML run: skipped without an NVIDIA GPU, run on the GPU machine."""

import numpy as np
import pytest

from mlpe.agent.sources.nvml import COL, NvmlGpus, nvml_available
from mlpe.v1 import metrics_pb2 as pb

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not nvml_available(), reason="no NVIDIA GPU / NVML here")]


def test_reads_every_gpu_at_100hz():
    gpus = NvmlGpus(hz=100)
    try:
        assert gpus.devices and all(d.uuid.startswith("GPU-") for d in gpus.devices)
        inventory = gpus.inventory()
        assert all(g.memory_total_mib > 0 and g.name for g in inventory)
        readings = []
        for k in range(20):
            if k % 10 == 0:
                gpus.read_utilization()
            readings.append(gpus.read(k, k).values)
        values = np.stack(readings)
        for field in (pb.GPU_MEM_USED, pb.GPU_MEM_TOTAL, pb.GPU_POWER, pb.GPU_TEMP,
                      pb.GPU_SM_CLOCK):
            assert np.isfinite(values[:, :, COL[field]]).all(), pb.Field.Name(field)
    finally:
        gpus.close()
