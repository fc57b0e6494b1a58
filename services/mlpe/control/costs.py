"""What a job costs: GPU-hours x the price of its GPU type, split into useful time, time
lost to failures and paused time.

A ledger per job lives in its Redis record. It is switched from one phase to the next at
the very time of the job event that causes the switch (the state change, the restart,
the recovery), so the split adds up exactly to the job's event log:

- useful: running, and not redoing lost work;
- failure: from a crash (or hang) until the relaunched job has again reached the step it
  had reached before: the relaunch, the checkpoint load and the recomputed steps. A job
  whose ranks do not report through mlpe.sdk shows no steps, so only its relaunch counts;
- paused: PAUSED keeps the job's processes and GPUs;
- a queued or ended job holds no GPU and costs nothing.

GPUs: the job's world size when it runs on CUDA (device "cuda", or "auto" on a machine
with a GPU), 0 on the CPU. The price is fixed at the job's first launch, from the price
table (MLPE_PRICES) for the controller's GPU type (MLPE_CONTROL_GPU_TYPE, else the GPU
NVML finds) and MLPE_PRICING.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from mlpe.common import prices
from mlpe.common.gpus import canonical
from mlpe.v1 import control_pb2

log = logging.getLogger("mlpe.control")
USEFUL, FAILURE, PAUSED = "useful", "failure", "paused"
PHASES = (USEFUL, FAILURE, PAUSED)
S = control_pb2.JobState


@dataclasses.dataclass
class Ledger:
    gpus: int
    gpu_type: str                 # "" on the CPU or when the GPU type is not known
    pricing: str                  # on_demand or spot
    price: float                  # per GPU-hour; 0 = not priced
    currency: str
    useful_s: float = 0.0
    failure_s: float = 0.0
    paused_s: float = 0.0
    phase: str = ""               # "" = holds no GPU now
    since_ns: int = 0             # when the current phase began
    catch_up_step: int = 0        # after a failure: the step to reach again; 0 = none

    def switch(self, phase: str, now_ns: int) -> None:
        """Close the current phase at `now_ns` and start `phase` ("" = none)."""
        if self.phase:
            name = f"{self.phase}_s"
            setattr(self, name, getattr(self, name) + max(0, now_ns - self.since_ns) / 1e9)
        self.phase, self.since_ns = phase, now_ns

    def seconds(self, now_ns: int) -> dict[str, float]:
        """Wall seconds per phase up to `now_ns`, the running phase included."""
        out = {p: getattr(self, f"{p}_s") for p in PHASES}
        if self.phase:
            out[self.phase] += max(0, now_ns - self.since_ns) / 1e9
        return out

    def total(self, now_ns: int) -> float:
        return sum(self.seconds(now_ns).values()) * self.gpus * self.price / 3600

    def proto(self, job_id: str, name: str, now_ns: int,
              budget: float = 0.0) -> control_pb2.JobCost:
        s = self.seconds(now_ns)
        money = {p: s[p] * self.gpus * self.price / 3600 for p in PHASES}
        return control_pb2.JobCost(
            job_id=job_id, name=name, time_ns=now_ns, gpus=self.gpus, gpu_type=self.gpu_type,
            pricing=self.pricing, price_per_gpu_hour=self.price, currency=self.currency,
            useful_s=s[USEFUL], failure_s=s[FAILURE], paused_s=s[PAUSED],
            gpu_hours=sum(s.values()) * self.gpus / 3600, total=sum(money.values()),
            useful=money[USEFUL], failure=money[FAILURE], paused=money[PAUSED],
            phase=self.phase, budget=budget)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> Ledger | None:
        return cls(**json.loads(raw)) if raw else None


def phase_of(state: int, ledger: Ledger) -> str:
    """The phase a job in `state` is in."""
    if state == S.JOB_STATE_RUNNING:
        return FAILURE if ledger.catch_up_step else USEFUL
    return PAUSED if state == S.JOB_STATE_PAUSED else ""


def summary(cost: control_pb2.JobCost) -> str:
    """One line: total, split and what it is made of."""
    if not cost.gpus:
        return "no GPU (CPU job): cost 0"
    hours = f"{cost.gpu_hours:.3f} GPU-hours of {cost.gpus} x {cost.gpu_type or 'GPU'}"
    if not cost.price_per_gpu_hour:
        return f"{hours} (no price for this GPU type: GPU-hours only)"
    return (f"{cost.total:.4f} {cost.currency}: useful {cost.useful:.4f}, failures "
            f"{cost.failure:.4f}, paused {cost.paused:.4f} ({hours} at "
            f"{cost.price_per_gpu_hour:g} {cost.currency}/GPU-hour {cost.pricing})")


def detect_gpu() -> tuple[bool, str]:
    """Whether NVML finds a GPU here, and the GPU type of the first ("" if none or a model
    mlpe.common.gpus does not know)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() == 0:
                return False, ""
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver or no GPU: none
        return False, ""
    name = name.decode() if isinstance(name, bytes) else name
    return True, canonical(name) or ""


class Pricer:
    """Opens a job's ledger at its first launch: its GPUs, GPU type and price."""

    def __init__(self, table: prices.PriceTable, gpu_type: str, pricing: str,
                 has_gpu: bool):
        self.table, self.gpu_type, self.pricing = table, gpu_type, pricing
        self.has_gpu = has_gpu  # what device "auto" resolves to

    def open(self, resolved: dict) -> tuple[Ledger, str]:
        """The ledger, and a note for the event log when the job is not priced ("")."""
        device = resolved.get("device", "auto")
        on_gpu = device == "cuda" or (device == "auto" and self.has_gpu)
        gpus = resolved["world_size"] if on_gpu else 0
        note, price = "", 0.0
        if gpus and not self.gpu_type:
            note = ("GPU type unknown (no GPU found and MLPE_CONTROL_GPU_TYPE unset): cost "
                    "counted in GPU-hours only")
        elif gpus:
            try:
                price = self.table.per_gpu_hour(self.gpu_type, self.pricing)
            except prices.PriceError as err:
                note = f"{err}: cost counted in GPU-hours only"
        return Ledger(gpus, self.gpu_type if gpus else "", self.pricing, price,
                      self.table.currency), note
