"""What a GPU-hour costs: the price table (deploy/prices/default.yaml, or the file in
MLPE_PRICES), per GPU type, on-demand and spot, in one currency. A malformed file is a
PriceError naming its line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import yaml

from mlpe.common.gpus import GPU_TYPES, canonical

KINDS = ("on_demand", "spot")
MAX_PRICE = 1000.0  # per GPU-hour: anything above is a typo (cents for dollars)


class PriceError(ValueError):
    """A price table that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Price:
    on_demand: float  # per GPU-hour
    spot: float

    def of(self, kind: str) -> float:
        if kind not in KINDS:
            raise PriceError(f"price kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return getattr(self, kind)


@dataclasses.dataclass(frozen=True)
class PriceTable:
    currency: str
    source: str
    date: str
    gpus: dict[str, Price]  # by GPU type (mlpe.common.gpus)

    def per_gpu_hour(self, gpu: str, kind: str = "on_demand") -> float:
        """The price of one GPU-hour of `gpu` (any name canonical() knows)."""
        key = canonical(gpu)
        if key is None or key not in self.gpus:
            raise PriceError(f"no price for GPU {gpu!r}: the table has "
                             f"{', '.join(sorted(self.gpus))}")
        return self.gpus[key].of(kind)


def load(path: str | Path) -> PriceTable:
    """The table in `path`, checked: every GPU type known, every price a number in
    [0, MAX_PRICE]. Errors name `path:line`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise PriceError(f"{path}: cannot read the price table: {err.strerror}") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PriceError(f"{path}{line}: not YAML: {getattr(err, 'problem', err)}") from None

    def where(node) -> str:
        return f"{path}:{node.start_mark.line + 1}"

    if not isinstance(root, yaml.MappingNode):
        raise PriceError(f"{path}:1: expected a mapping with currency, source, date, gpus")
    top = {k.value: v for k, v in root.value}
    for name in ("currency", "source", "date", "gpus"):
        if name not in top:
            raise PriceError(f"{where(root)}: {name} is missing")
    unknown = sorted(set(top) - {"currency", "source", "date", "gpus"})
    if unknown:
        raise PriceError(f"{where(root)}: unknown key {unknown[0]!r}")
    for name in ("currency", "source", "date"):
        if not isinstance(top[name], yaml.ScalarNode) or not str(top[name].value).strip():
            raise PriceError(f"{where(top[name])}: {name} must be a non-empty text")
    currency = top["currency"].value.strip()
    if not (currency.isalpha() and currency.isupper() and len(currency) == 3):
        raise PriceError(f"{where(top['currency'])}: currency must be an ISO 4217 code like "
                         f"USD or EUR, got {currency!r}")
    if not isinstance(top["gpus"], yaml.MappingNode) or not top["gpus"].value:
        raise PriceError(f"{where(top['gpus'])}: gpus must map GPU types to prices")
    gpus: dict[str, Price] = {}
    for key, value in top["gpus"].value:
        gpu = canonical(key.value)
        if gpu is None:
            raise PriceError(f"{where(key)}: unknown GPU type {key.value!r}: expected one of "
                             f"{', '.join(GPU_TYPES)}")
        if gpu in gpus:
            raise PriceError(f"{where(key)}: {key.value!r} is priced twice")
        if not isinstance(value, yaml.MappingNode):
            raise PriceError(f"{where(value)}: {key.value}: expected {{on_demand: N, spot: N}}")
        fields = {k.value: v for k, v in value.value}
        amounts = {}
        for kind in KINDS:
            if kind not in fields:
                raise PriceError(f"{where(value)}: {key.value}: {kind} is missing")
            raw = fields[kind].value
            try:
                amount = float(raw)
            except (TypeError, ValueError):
                amount = math.nan
            if not (isinstance(raw, str) and 0 <= amount <= MAX_PRICE):
                raise PriceError(f"{where(fields[kind])}: {key.value}: {kind} must be a price "
                                 f"per GPU-hour between 0 and {MAX_PRICE:g}, got {raw!r}")
            amounts[kind] = amount
        extra = sorted(set(fields) - set(KINDS))
        if extra:
            raise PriceError(f"{where(value)}: {key.value}: unknown key {extra[0]!r}")
        gpus[gpu] = Price(**amounts)
    return PriceTable(currency, top["source"].value.strip(), str(top["date"].value).strip(),
                      gpus)
