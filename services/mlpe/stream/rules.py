"""Threshold rules from YAML: `gpu.temp > 85 for 10s → critical`, checked at load.

A rule file (format in deploy/rules/README.md):

    rules:
      - name: gpu_hot
        when: gpu.temp.max > 85        # <measurement>.<field>[.<min|mean|max|last>] <op> <number>
        for: 10s                       # hold: true this long before firing (0s: at once)
        severity: critical             # info | warning | critical
        labels: {node: "rack1-*"}      # optional matchers (shell-style patterns)
        summary: "GPU {gpu} on {node} is hot"
        explanation: "{value:.0f} °C for {for}, limit {threshold:g} °C"

Rules are evaluated on every batch (100 ms of samples of a node's devices) with the
batch statistic named in `when` (`evaluate`); the state (since when true, firing or
not) is kept per rule and device in a mapping the caller owns.
"""

from __future__ import annotations

import fnmatch
import math
import operator
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mlpe.common import batches
from mlpe.common.alerts import fingerprint
from mlpe.v1 import alerts_pb2 as al
from mlpe.v1 import metrics_pb2

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
       "==": operator.eq, "!=": operator.ne}
SEVERITIES = {"info": al.SEVERITY_INFO, "warning": al.SEVERITY_WARNING,
              "critical": al.SEVERITY_CRITICAL}
STATS = ("min", "mean", "max", "last")
WHEN = re.compile(r"^\s*(gpu|host)\.([a-z0-9_]+)(?:\.(min|mean|max|last))?\s*"
                  r"(>=|<=|==|!=|>|<)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")
DURATION = re.compile(r"^\s*([0-9.]+)\s*(ms|s|m|h)?\s*$")
FIELDS = {"gpu": {batches.field_name(f): f for f in batches.GPU_FIELDS},
          "host": {batches.field_name(f): f for f in batches.HOST_FIELDS}}


class RulesError(ValueError):
    """A bad rules file; the message names the file and the line."""


@dataclass(frozen=True)
class Rule:
    name: str
    measurement: str        # "gpu" or "host"
    field: int              # pb.Field number
    stat: str               # min, mean, max or last over the batch
    op: str
    threshold: float
    hold_s: float
    severity: int
    matchers: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    explanation: str = ""
    line: int = 0
    when: str = ""          # the condition as written, for messages

    def test(self, value: float) -> bool:
        return OPS[self.op](value, self.threshold)

    def matches(self, labels: dict[str, str]) -> bool:
        return all(fnmatch.fnmatchcase(labels.get(k, ""), pattern)
                   for k, pattern in self.matchers.items())


def parse_duration(text: str) -> float:
    m = DURATION.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m or 250ms")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * scale


def parse(text: str, where: str = "rules") -> list[Rule]:
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise RulesError(f"{where}, line {mark.line + 1 if mark else '?'}: not valid YAML: "
                         f"{getattr(err, 'problem', err)}") from None
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise RulesError(f"{where}, line 1: expected a mapping with a 'rules' list")
    top = {k.value: v for k, v in root.value}
    items = top.get("rules")
    if items is None:
        return []
    if not isinstance(items, yaml.SequenceNode):
        raise RulesError(f"{where}, line {items.start_mark.line + 1}: 'rules' must be a list")
    out, names = [], set()
    for node in items.value:
        line = node.start_mark.line + 1
        here = f"{where}, line {line}"
        if not isinstance(node, yaml.MappingNode):
            raise RulesError(f"{here}: each rule must be a mapping")
        item = yaml.safe_load(yaml.serialize(node))
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
        unknown = set(item) - {"name", "when", "for", "severity", "labels", "summary",
                               "explanation"}
        if unknown:
            key = sorted(unknown)[0]
            raise RulesError(f"{where}, line {lines[key]}: unknown key {key!r}")
        for key in ("name", "when", "severity"):
            if key not in item:
                raise RulesError(f"{here}: rule has no {key!r}")
        name = str(item["name"])
        if name in names:
            raise RulesError(f"{where}, line {lines['name']}: rule {name!r} defined twice")
        names.add(name)
        m = WHEN.match(str(item["when"]))
        if not m:
            raise RulesError(f"{where}, line {lines['when']}: cannot read {item['when']!r}; "
                             "expected e.g. 'gpu.temp.max > 85'")
        measurement, field_name, stat, op, threshold = m.groups()
        number = FIELDS[measurement].get(field_name)
        if number is None:
            known = sorted(FIELDS[measurement])
            raise RulesError(f"{where}, line {lines['when']}: {measurement} has no field "
                             f"{field_name!r} (fields: {', '.join(known)})")
        severity = SEVERITIES.get(str(item["severity"]))
        if severity is None:
            raise RulesError(f"{where}, line {lines['severity']}: severity must be one of "
                             f"{', '.join(SEVERITIES)}")
        try:
            hold = parse_duration(item.get("for", "0s"))
        except ValueError as err:
            raise RulesError(f"{where}, line {lines.get('for', line)}: 'for': {err}") from None
        labels = item.get("labels") or {}
        if not isinstance(labels, dict):
            raise RulesError(f"{where}, line {lines['labels']}: 'labels' must be a mapping")
        out.append(Rule(name=name, measurement=measurement, field=number, stat=stat or "mean",
                        op=op, threshold=float(threshold), hold_s=hold, severity=severity,
                        matchers={str(k): str(v) for k, v in labels.items()},
                        summary=str(item.get("summary", name)),
                        explanation=str(item.get("explanation", "")), line=line,
                        when=str(item["when"]).strip()))
    return out


def load(path: str | Path) -> list[Rule]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise RulesError(f"{path}: cannot read rules: {err.strerror}") from None
    return parse(text, str(path))


def device_stats(values: np.ndarray, stat: str) -> np.ndarray:
    """`stat` of each device's finite samples: values (devices, samples) -> (devices,),
    NaN for a device without one."""
    with np.errstate(all="ignore"):
        finite = np.isfinite(values)
        counts = finite.sum(axis=1)
        if stat == "min":
            out = np.where(finite, values, np.inf).min(axis=1)
        elif stat == "max":
            out = np.where(finite, values, -np.inf).max(axis=1)
        elif stat == "mean":
            out = np.where(finite, values, 0.0).sum(axis=1) / counts
        else:  # last
            last = values.shape[1] - 1 - np.argmax(finite[:, ::-1], axis=1)
            out = values[np.arange(len(values)), last]
    return np.where(counts > 0, out, np.nan).astype(np.float64)


def step(rule: Rule, state: dict | None, value: float, t_ns: int) -> tuple[dict, int | None]:
    """One evaluation: (new state, ALERT_FIRING / ALERT_RESOLVED to send, or None)."""
    state = dict(state or {"since": 0, "firing": False})
    if rule.test(value):
        if not state["since"]:
            state["since"] = t_ns
        if not state["firing"] and t_ns - state["since"] >= rule.hold_s * 1e9:
            state["firing"] = True
            return state, al.ALERT_FIRING
        return state, None
    was_firing = state["firing"]
    state = {"since": 0, "firing": False, "last_since": state["since"]}
    return state, (al.ALERT_RESOLVED if was_firing else None)


def render(template: str, **values) -> str:
    try:
        return template.format(**values)
    except (KeyError, ValueError, IndexError):
        return template


def evaluate(rules: list[Rule], states: dict[str, dict],
             batch: batches.NodeBatch | batches.Batch) -> list[al.Alert]:
    """The alerts `rules` raise or resolve on one batch (every device of a node); `states`
    ({rule|node|gpu: state}) is updated in place. In memory only: a restart re-arms the
    hold timers. A device whose value does not meet the rule and that has no state is
    skipped without a call: the common case, thousands of times a second."""
    if isinstance(batch, batches.Batch):
        batch = batches.join([batch])
    kind = "gpu" if batch.device_kind == metrics_pb2.DEVICE_KIND_GPU else "host"
    out = []
    t_ns = int(batch.timestamps_ns[-1]) if batch.samples else 0
    indices = batch.device_indices.tolist()
    for rule in rules:
        values = batch.columns.get(rule.field)
        if rule.measurement != kind or values is None or not batch.samples:
            continue
        stats = device_stats(np.asarray(values, dtype=np.float64), rule.stat)
        with np.errstate(invalid="ignore"):
            met = OPS[rule.op](stats, rule.threshold)
        for d, index in enumerate(indices):
            gpu = str(index) if kind == "gpu" else ""
            key = f"{rule.name}|{batch.node_id}|{gpu}"
            value = float(stats[d])
            if math.isnan(value) or (not met[d] and key not in states):
                continue
            labels = {"node": batch.node_id, "gpu": gpu} if kind == "gpu" else \
                {"node": batch.node_id}
            if not rule.matches(labels):
                continue
            states[key], change = step(rule, states.get(key), value, t_ns)
            state = states[key]
            if not state["firing"] and not state["since"]:
                del states[key]  # idle again: nothing to remember (keeps the fast path)
            if change is None:
                continue
            hold = f"{rule.hold_s:g}s"
            text = dict(labels, gpu=gpu, value=value, threshold=rule.threshold,
                        **{"for": hold})
            firing = change == al.ALERT_FIRING
            since = state["since"] if firing else state.get("last_since", 0)
            out.append(al.Alert(
                fingerprint=fingerprint(rule.name, batch.node_id, gpu),
                rule=rule.name, detector="rule", severity=rule.severity, state=change,
                labels=labels, value=value, threshold=rule.threshold, starts_at_ns=since,
                ends_at_ns=0 if firing else t_ns, detected_at_ns=time.time_ns(),
                summary=render(rule.summary, **text),
                explanation=render(rule.explanation, **text) if firing else
                f"Cleared: {rule.when} no longer holds (now {value:g})."))
    return out
