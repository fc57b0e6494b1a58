"""GPU types by one name each, for everything that names them: the planner's catalogue
(optimizer/hardware.py), the price table (prices.py), and GPU models as NVML reports them
("NVIDIA H100 80GB HBM3")."""

from __future__ import annotations

import re

GPU_TYPES = ("a100-40gb", "a100-80gb", "h100-sxm", "h200")
ALIASES = {
    "a100": "a100-80gb", "a100-80g": "a100-80gb", "a100-40g": "a100-40gb",
    "a100-sxm4-80gb": "a100-80gb", "a100-sxm4-40gb": "a100-40gb",
    "h100": "h100-sxm", "h100-sxm5": "h100-sxm", "h100-80gb": "h100-sxm",
    "h100-80gb-hbm3": "h100-sxm", "h200-sxm": "h200", "h200-141gb": "h200",
    **{name: name for name in GPU_TYPES},
}


def canonical(name: str) -> str | None:
    """The GPU type a name or NVML model string means, or None: "H100", "a100-40GB",
    "NVIDIA H100 80GB HBM3" and "NVIDIA A100-SXM4-80GB" are all understood."""
    key = re.sub(r"[\s_]+", "-", str(name).strip().lower())
    key = key.removeprefix("nvidia-")
    return ALIASES.get(key)
