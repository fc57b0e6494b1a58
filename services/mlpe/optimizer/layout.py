"""A training layout: how one run is split over its GPUs and how it saves memory.

tp * pp * cp * dp = GPUs: tensor parallel (tp; sequence parallel is on whenever tp > 1),
pipeline stages (pp, each with `virtual_stages` interleaved chunks), context parallel (cp)
and data parallel (dp) sizes; expert parallel (ep, MoE only) splits the experts over part
of the data-parallel group. Each data-parallel replica runs grad_accum micro-batches of
micro_batch sequences per step. zero_stage shards the model states (3 is FSDP's full
sharding), recompute trades compute for activation memory, offload moves states to CPU
memory.

One Layout holds one layout, or many: the search fills every field with a numpy array (one
entry per layout) so that memory.py and timing.py evaluate thousands at once with the
formulas they use for one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mlpe.optimizer.errors import PlanInputError

RECOMPUTE = ("none", "selective", "full")
OFFLOAD = ("none", "optimizer", "params")
# Fields that hold a name; in arrays they hold its index (the formulas compare codes).
NAMES = {"recompute": RECOMPUTE, "offload": OFFLOAD}


@dataclasses.dataclass(frozen=True)
class Layout:
    """One layout, or many as numpy arrays of one length (see the module doc)."""
    tp: int = 1
    pp: int = 1
    virtual_stages: int = 1  # interleaved pipeline chunks per stage
    cp: int = 1
    dp: int = 1
    ep: int = 1
    micro_batch: int = 1  # sequences
    grad_accum: int = 1  # micro-batches per step per data-parallel replica
    zero_stage: int = 0  # 1 shards the optimizer state, 2 also gradients, 3 also weights
    recompute: str = "none"  # one of RECOMPUTE
    offload: str = "none"  # one of OFFLOAD

    @property
    def sp(self):
        return self.tp > 1

    @property
    def fsdp(self):  # ZeRO-3 and FSDP's full sharding are modelled identically
        return self.zero_stage == 3

    @property
    def gpus(self):
        return self.tp * self.pp * self.cp * self.dp

    def values(self) -> dict[str, Any]:
        """The layout fields by name (of a Plan: only those of its layout)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Layout)}

    def replace(self, **change: Any) -> Layout:
        """A plain Layout with `change` applied (a Plan's layout, without its figures)."""
        return Layout(**{**self.values(), **change})

    def arrays(self) -> Layout:
        """The numpy form the formulas compute with: sizes as floats (they divide by
        them), recompute and offload as codes. Bad names raise PlanInputError."""
        return Layout(**{name: code(name, value) if name in NAMES
                         else np.asarray(value, dtype=float)
                         for name, value in self.values().items()})

    def select(self, mask: np.ndarray) -> Layout:
        """The layouts (of arrays) where `mask` is true."""
        return Layout(**{name: value[mask] for name, value in self.values().items()})

    def one(self, i: int) -> Layout:
        """The i-th of these layouts, in plain ints and names."""
        return Layout(**{name: NAMES[name][int(value[i])] if name in NAMES else int(value[i])
                         for name, value in self.values().items()})


def code(field: str, value: Any) -> np.ndarray:
    """A recompute or offload name as its index in RECOMPUTE / OFFLOAD; codes pass through."""
    if isinstance(value, str):
        names = NAMES[field]
        if value not in names:
            raise PlanInputError(f"plan.{field}", f"must be one of {', '.join(names)}, got "
                                                  f"{value!r}")
        return np.asarray(names.index(value))
    return np.asarray(value)
