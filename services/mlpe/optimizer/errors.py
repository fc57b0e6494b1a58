"""The planner's one error type: a bad input, named by the field it came from."""

from __future__ import annotations


class PlanInputError(ValueError):
    """An impossible or unknown planning input. `field` is the dotted name of the input
    ("model.heads", "cluster.nodes", "training.global_batch", ...), `reason` says what is
    wrong with it in words a user can act on."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
