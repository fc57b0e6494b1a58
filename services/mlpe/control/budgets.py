"""Budgets per label (MLPE_BUDGETS): what all the jobs carrying a label (`JobSpec.labels`,
e.g. team=vision) may cost together, in the price table's currency. The file:

    budgets:
      - label: team=vision      # key=value
        amount: 1000
        policy: warn            # at 100 %: pause, stop or warn (default warn)
        since: 2026-12-01       # optional: only jobs submitted on or after this day (UTC)

A malformed file is a BudgetError naming its line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from pathlib import Path

import yaml

from mlpe.common.jobs import BUDGET_POLICIES, LABEL, MAX_BUDGET


class BudgetError(ValueError):
    """A budgets file that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class LabelBudget:
    key: str
    value: str
    amount: float
    policy: str
    since_ns: int  # 0 = every job

    @property
    def label(self) -> str:
        return f"{self.key}={self.value}"

    def covers(self, record: dict) -> bool:
        labels = record["resolved"].get("labels") or {}
        return labels.get(self.key) == self.value and record["submitted_ns"] >= self.since_ns


def load(path: str | Path) -> list[LabelBudget]:
    path = Path(path)
    try:
        root = yaml.compose(path.read_text())
    except OSError as err:
        raise BudgetError(f"{path}: cannot read the budgets file: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise BudgetError(f"{path}{f':{mark.line + 1}' if mark else ''}: not YAML: "
                          f"{getattr(err, 'problem', err)}") from None

    def where(node) -> str:
        return f"{path}:{node.start_mark.line + 1}"

    if root is None:
        return []
    top = dict((k.value, v) for k, v in root.value) if isinstance(root, yaml.MappingNode) \
        else None
    if top is None or set(top) != {"budgets"} or not isinstance(top["budgets"],
                                                                   yaml.SequenceNode):
        raise BudgetError(f"{where(root)}: expected `budgets:` and a list of "
                          "{label, amount, policy, since}")
    out: list[LabelBudget] = []
    for item in top["budgets"].value:
        if not isinstance(item, yaml.MappingNode):
            raise BudgetError(f"{where(item)}: a budget is a mapping with label and amount")
        fields = {k.value: v for k, v in item.value}
        unknown = sorted(set(fields) - {"label", "amount", "policy", "since"})
        if unknown:
            raise BudgetError(f"{where(item)}: unknown key {unknown[0]!r}")
        for name in ("label", "amount"):
            if name not in fields:
                raise BudgetError(f"{where(item)}: {name} is missing")
        key, sep, value = str(fields["label"].value).partition("=")
        if not (sep and LABEL.fullmatch(key) and LABEL.fullmatch(value)):
            raise BudgetError(f"{where(fields['label'])}: label must be key=value (1-63 "
                              f"letters, digits and ._/- each), got {fields['label'].value!r}")
        try:
            amount = float(fields["amount"].value)
        except (TypeError, ValueError):
            amount = math.nan
        if not 0 < amount <= MAX_BUDGET:
            raise BudgetError(f"{where(fields['amount'])}: amount must be a number above 0 and "
                              f"at most {MAX_BUDGET:,.0f}, got {fields['amount'].value!r}")
        policy = str(fields["policy"].value) if "policy" in fields else "warn"
        if policy not in BUDGET_POLICIES:
            raise BudgetError(f"{where(fields['policy'])}: policy must be one of "
                              f"{', '.join(BUDGET_POLICIES)}, got {policy!r}")
        since_ns = 0
        if "since" in fields:
            try:
                day = dt.date.fromisoformat(str(fields["since"].value))
            except ValueError:
                raise BudgetError(f"{where(fields['since'])}: since must be a date like "
                                  f"2026-12-01, got {fields['since'].value!r}") from None
            since_ns = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
                           .timestamp()) * 10**9
        budget = LabelBudget(key, value, amount, policy, since_ns)
        if any(b.label == budget.label for b in out):
            raise BudgetError(f"{where(item)}: {budget.label} has two budgets")
        out.append(budget)
    return out
