"""What every source gives the agent: its devices, its fields, and one reading per tick."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mlpe.v1 import metrics_pb2 as pb


@dataclass(frozen=True)
class Device:
    node_id: str
    kind: int          # pb.DEVICE_KIND_GPU or pb.DEVICE_KIND_HOST
    index: int
    uuid: str = ""


@dataclass
class Reading:
    values: np.ndarray  # (devices, fields) float64; NaN where a value could not be read
    events: list[tuple[int, pb.DeviceEvent]] = field(default_factory=list)  # (device row, event)


class Source(Protocol):
    name: str
    devices: list[Device]
    fields: tuple[int, ...]   # pb.Field numbers, the columns of Reading.values

    def read(self, k: int, t_ns: int) -> Reading:
        """Sample every device once; k counts ticks from 0 (the simulator's clock)."""
        ...
