"""GPUs and clusters, as the planner sees them: memory, peak dense throughput, links.

Figures are the vendors' public datasheet numbers (dense, i.e. without 2:4 sparsity).
Memory is the datasheet capacity read as GiB (nvidia-smi reports 79.6 GiB usable on an
"80 GB" H100 and 140.4 GiB on a "141 GB" H200: the planner's reserve covers the gap).
Bandwidths are in GB/s (1e9 bytes/s), per GPU and per direction.

`achievable` is a calibration constant: the fraction of the dense peak that the large
matrix multiplications of LLM training reach, before communication and pipeline bubbles
(which the timing model adds separately). It is fitted with the step-time constants
(timing.Constants) on published runs by `mlpe bench plan` (README, "Published runs"):
0.70 on A100 from five Megatron-LM runs (Narayanan et al. 2021, Table 1: 1.7B-530B on
32-2,520 GPUs), 0.75 on H100 from Llama 3 405B on 8,192 GPUs (the Llama 3 paper, Table
4; the value rests on one run and on its pipeline chunks, which the paper does not give:
0.65-0.75 for 2-8 chunks). H200: no published run here; the H100's value.
"""

from __future__ import annotations

import dataclasses
import re

from mlpe.common.gpus import canonical
from mlpe.optimizer.errors import PlanInputError


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense tensor-core peak, TFLOP/s
    fp8_tflops: float  # dense; 0 where the GPU has no fp8 tensor cores
    hbm_gbps: float
    achievable: float  # fraction of peak reached by large-matmul training (see above)
    intra_node_gbps: float = 300.0  # NVLink per GPU, one direction
    inter_node_gbps: float = 25.0  # network per GPU, one direction (200 Gb/s = 25 GB/s)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def tf32_tflops(self) -> float:
        """fp32 training runs its matmuls on TF32 tensor cores: half the bf16 rate."""
        return self.bf16_tflops / 2


GPUS: dict[str, GPU] = {
    # A100 SXM: 312 TF bf16, NVLink 3 600 GB/s both ways, HDR 200 Gb/s per GPU.
    "a100-40gb": GPU("a100-40gb", 40, 312, 0, 1555, 0.70, 300, 25),
    "a100-80gb": GPU("a100-80gb", 80, 312, 0, 2039, 0.70, 300, 25),
    # H100 SXM: 989 TF bf16, 1979 TF fp8, NVLink 4 900 GB/s both ways, NDR 400 Gb/s.
    "h100-sxm": GPU("h100-sxm", 80, 989, 1979, 3350, 0.75, 450, 50),
    "h200": GPU("h200", 141, 989, 1979, 4800, 0.75, 450, 50),
}

HOST_USABLE = 0.8  # of a node's CPU memory, for offload (the OS, pinned buffers, data loaders)

def gpu(name: str, field: str = "cluster.gpu") -> GPU:
    """A preset by name or alias, case-insensitive ("H100", "a100-40GB", "h200")."""
    key = canonical(name)
    if key not in GPUS:
        raise PlanInputError(field, f"unknown GPU {name!r}: expected one of "
                                    f"{', '.join(sorted(GPUS))} (or H100, A100, A100-40GB, "
                                    "H200)")
    return GPUS[key]


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: GPU
    intra_gbps: float = 0.0  # 0: the GPU's NVLink figure
    inter_gbps: float = 0.0  # 0: the GPU's network figure
    host_memory_gib: float = 2048.0  # CPU memory per node (DGX A100/H100: 1-2 TiB)

    def __post_init__(self):
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanInputError(f"cluster.{name}", f"must be a whole number ≥ 1, got "
                                                        f"{value!r}")
        if not isinstance(self.gpu, GPU):
            object.__setattr__(self, "gpu", gpu(self.gpu))
        for name, default in (("intra_gbps", self.gpu.intra_node_gbps),
                              ("inter_gbps", self.gpu.inter_node_gbps)):
            value = getattr(self, name)
            if value < 0:
                raise PlanInputError(f"cluster.{name}", f"must be ≥ 0, got {value}")
            if not value:
                object.__setattr__(self, name, float(default))
        if self.host_memory_gib < 0:
            raise PlanInputError("cluster.host_memory_gib", f"must be ≥ 0, got "
                                                            f"{self.host_memory_gib}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def host_bytes_per_gpu(self) -> float:
        """CPU memory offload may use per GPU: HOST_USABLE of the node's, shared."""
        return self.host_memory_gib * 2**30 * HOST_USABLE / self.gpus_per_node

    def __str__(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node}x{self.gpu.name}"


_SPEC = re.compile(r"^\s*(?:(\d+)\s*[x\u00d7*]\s*)?(\d+)\s*[x\u00d7*]\s*([a-z0-9_\-]+)\s*$", re.I)


def parse_cluster(spec: str) -> Cluster:
    """"16x8xH100" (nodes x GPUs per node x GPU) or "8xA100" (one node) -> Cluster."""
    match = _SPEC.match(str(spec))
    if not match:
        raise PlanInputError("cluster", f"{spec!r} is not NODESxGPUSxTYPE (e.g. 16x8xH100) or "
                                        "GPUSxTYPE (e.g. 8xA100)")
    nodes, per_node, name = match.groups()
    return Cluster(int(nodes) if nodes else 1, int(per_node), gpu(name))
