"""Simulator scenarios: the fleet, its training rhythm and the faults to inject.

A scenario file is YAML and the ground truth for detector evaluation: every
fault has a node, a GPU (or all GPUs), an onset and a duration. The format is
in scenarios/README.md beside this file; errors name the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

FAULT_KINDS = {
    # kind: (default magnitude, what magnitude means)
    "thermal_throttle": (0.4, "fraction of SM clock lost while throttled"),
    "power_cap": (0.6, "power limit as a fraction of the normal limit"),
    "xid": (79.0, "the Xid code (also accepted as `code`)"),
    "ecc_error": (1.0, "uncorrected ECC errors added at onset"),
    "memory_leak": (256.0, "MiB of device memory leaked per second"),
    "input_starvation": (0.3, "fraction of normal utilization left"),
    "straggler": (0.3, "fraction of SM clock lost by the straggler; peers wait for it"),
    "link_degradation": (0.8, "fraction of NVLink and PCIe bandwidth lost"),
    "stall": (1.0, "(unused) the job stops: utilization and traffic fall to zero"),
    "gpu_lost": (1.0, "(unused) the GPU stops answering, as if it fell off the bus"),
    # Training-only kinds: they change the job's step events, not any GPU's metrics.
    "nan_loss": (1.0, "(unused) every rank's loss is NaN; no for_s = one step"),
    "loss_spike": (4.0, "loss multiplier; no for_s = one step"),
    "slow_steps": (1.5, "step time multiplier (a throughput regression)"),
}
INSTANT_KINDS = {"xid", "ecc_error"}
TRAINING_ONLY_KINDS = {"nan_loss", "loss_spike", "slow_steps"}
ONE_STEP_KINDS = {"nan_loss", "loss_spike"}  # without for_s they hit exactly one step
TRAINING_KEYS = {"step_time_s", "compute_fraction", "warmup_s", "idle_gaps",
                 "tokens_per_step", "loss_start", "job_id", "step_jitter"}
# What the job does during a pause (an idle_gaps entry's kind); no training step ends in any.
GAP_KINDS = {
    "idle": "between epochs or waiting: utilization 0, no traffic",
    "checkpoint": "state copied to the host: utilization ~5 %, PCIe out busy, no NVLink",
    "eval": "evaluation: forward passes only, steady ~70 % utilization, no all-reduce",
}


class ScenarioError(ValueError):
    """An invalid scenario; the message names the file and line."""


@dataclass(frozen=True)
class Fault:
    kind: str
    node: int              # node index
    gpu: int | None        # GPU index on the node; None = every GPU of the node
    at_s: float            # onset, seconds after the agent starts
    for_s: float | None    # duration; None = until the end
    magnitude: float
    line: int = 0

    def active(self, t_s: float) -> bool:
        return t_s >= self.at_s and (self.for_s is None or t_s < self.at_s + self.for_s)


@dataclass(frozen=True)
class IdleGap:
    at_s: float
    for_s: float
    kind: str = "idle"   # one of GAP_KINDS


@dataclass(frozen=True)
class Scenario:
    seed: int = 0
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_model: str = "NVIDIA H100 80GB HBM3"
    step_time_s: float = 0.5     # one training step: compute, then communication
    compute_fraction: float = 0.8
    warmup_s: float = 10.0
    idle_gaps: tuple[IdleGap, ...] = ()
    tokens_per_step: int = 16384  # per rank
    loss_start: float = 10.0
    step_jitter: float = 0.0     # each step's time varies by up to ± this fraction
    job_id: str | None = None     # None: the simulated job picks one from the node prefix
    faults: tuple[Fault, ...] = field(default_factory=tuple)


def _mapping(node: yaml.Node, where: str) -> dict[str, tuple[object, int]]:
    """A YAML mapping as {key: (python value, line)}; lines are 1-based."""
    if not isinstance(node, yaml.MappingNode):
        raise ScenarioError(f"{where}, line {node.start_mark.line + 1}: expected a mapping")
    out = {}
    for key, value in node.value:
        out[key.value] = (value, value.start_mark.line + 1)
    return out


def _scalar(node: yaml.Node, kind: type, name: str, where: str, line: int, minimum=None):
    if not isinstance(node, yaml.ScalarNode):
        raise ScenarioError(f"{where}, line {line}: {name} must be a {kind.__name__}")
    value = yaml.safe_load(node.value) if node.tag != "tag:yaml.org,2002:str" else node.value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ScenarioError(f"{where}, line {line}: {name} must be a {kind.__name__}, "
                            f"got {node.value!r}")
    if minimum is not None and value < minimum:
        raise ScenarioError(f"{where}, line {line}: {name} must be >= {minimum}, got {value}")
    return value


def parse(text: str, where: str = "scenario") -> Scenario:
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise ScenarioError(f"{where}{line}: not valid YAML: "
                            f"{getattr(err, 'problem', err)}") from None
    if root is None:
        return Scenario()
    top = _mapping(root, where)
    known = {"seed", "nodes", "gpus_per_node", "gpu_model", "training", "faults"}
    for key, (_, line) in top.items():
        if key not in known:
            raise ScenarioError(f"{where}, line {line}: unknown key {key!r} "
                                f"(expected one of {', '.join(sorted(known))})")

    def get(mapping, key, kind, default, minimum=None):
        if key not in mapping:
            return default
        node, line = mapping[key]
        return _scalar(node, kind, key, where, line, minimum)

    nodes = get(top, "nodes", int, 1, 1)
    gpus = get(top, "gpus_per_node", int, 8, 1)
    training = {}
    if "training" in top:
        training = _mapping(top["training"][0], where)
    for key, (_, line) in training.items():
        if key not in TRAINING_KEYS:
            raise ScenarioError(f"{where}, line {line}: unknown training key {key!r} "
                                f"(expected one of {', '.join(sorted(TRAINING_KEYS))})")
    job_id = get(training, "job_id", str, None)
    if job_id is not None and not job_id.strip():
        raise ScenarioError(f"{where}, line {training['job_id'][1]}: job_id must not be empty")
    gaps = []
    if "idle_gaps" in training:
        gaps_node, gaps_line = training["idle_gaps"]
        if not isinstance(gaps_node, yaml.SequenceNode):
            raise ScenarioError(f"{where}, line {gaps_line}: idle_gaps must be a list")
        for item in gaps_node.value:
            gap = _mapping(item, where)
            for key, (_, line) in gap.items():
                if key not in {"at_s", "for_s", "kind"}:
                    raise ScenarioError(f"{where}, line {line}: unknown idle_gaps key {key!r} "
                                        "(expected at_s, for_s, kind)")
            kind = get(gap, "kind", str, "idle")
            if kind not in GAP_KINDS:
                raise ScenarioError(f"{where}, line {gap['kind'][1]}: unknown gap kind "
                                    f"{kind!r} (expected one of {', '.join(sorted(GAP_KINDS))})")
            gaps.append(IdleGap(get(gap, "at_s", float, 0.0, 0), get(gap, "for_s", float, 0.0, 0),
                                kind))
    faults = []
    if "faults" in top:
        faults_node, faults_line = top["faults"]
        if not isinstance(faults_node, yaml.SequenceNode):
            raise ScenarioError(f"{where}, line {faults_line}: faults must be a list")
        for item in faults_node.value:
            faults.append(_fault(item, where, get, nodes, gpus))
    step_time = get(training, "step_time_s", float, 0.5, 0.02)
    return Scenario(
        seed=get(top, "seed", int, 0),
        nodes=nodes,
        gpus_per_node=gpus,
        gpu_model=get(top, "gpu_model", str, Scenario.gpu_model),
        step_time_s=step_time,
        compute_fraction=get(training, "compute_fraction", float, 0.8, 0.0),
        warmup_s=get(training, "warmup_s", float, 10.0, 0.0),
        idle_gaps=tuple(gaps),
        tokens_per_step=get(training, "tokens_per_step", int, 16384, 1),
        loss_start=get(training, "loss_start", float, 10.0, 0.01),
        step_jitter=_jitter(get(training, "step_jitter", float, 0.0, 0.0), where,
                            training.get("step_jitter", (None, 0))[1]),
        job_id=job_id,
        faults=tuple(faults),
    )


def _jitter(value: float, where: str, line: int) -> float:
    if value >= 0.5:  # a step may vary, never take (nearly) no time
        raise ScenarioError(f"{where}, line {line}: step_jitter must be below 0.5, got {value}")
    return value


def _fault(item: yaml.Node, where: str, get, nodes: int, gpus: int) -> Fault:
    fault = _mapping(item, where)
    line = item.start_mark.line + 1
    if "kind" not in fault:
        raise ScenarioError(f"{where}, line {line}: fault has no kind")
    kind = get(fault, "kind", str, "")
    if kind not in FAULT_KINDS:
        raise ScenarioError(f"{where}, line {fault['kind'][1]}: unknown fault kind {kind!r} "
                            f"(expected one of {', '.join(sorted(FAULT_KINDS))})")
    known = {"kind", "node", "gpu", "at_s", "for_s", "magnitude", "code"}
    for key, (_, key_line) in fault.items():
        if key not in known:
            raise ScenarioError(f"{where}, line {key_line}: unknown fault key {key!r}")
    node = get(fault, "node", int, 0, 0)
    if node >= nodes:
        raise ScenarioError(f"{where}, line {fault['node'][1]}: node {node} does not exist "
                            f"(the scenario has {nodes} nodes, 0-{nodes - 1})")
    gpu = None
    if "gpu" in fault and fault["gpu"][0].value != "all":
        gpu = get(fault, "gpu", int, 0, 0)
        if gpu >= gpus:
            raise ScenarioError(f"{where}, line {fault['gpu'][1]}: gpu {gpu} does not exist "
                                f"({gpus} GPUs per node, 0-{gpus - 1})")
    if "at_s" not in fault:
        raise ScenarioError(f"{where}, line {line}: fault {kind!r} has no onset at_s")
    # A step can only be slowed down, never made infinitely fast.
    magnitude = get(fault, "magnitude", float, FAULT_KINDS[kind][0],
                    1.0 if kind == "slow_steps" else None)
    if kind == "xid":
        magnitude = float(get(fault, "code", int, int(magnitude), 1))
    for_s = get(fault, "for_s", float, None, 0)
    if kind in INSTANT_KINDS:
        for_s = for_s if for_s is not None else 0.0
    return Fault(kind=kind, node=node, gpu=gpu, at_s=get(fault, "at_s", float, 0.0, 0),
                 for_s=for_s, magnitude=magnitude, line=line)


def packaged(name: str = "") -> Path:
    """A scenario (or folder of them) shipped with mlpe, e.g. packaged("run.yaml"),
    packaged("detect"); their format is scenarios/README.md beside this file."""
    return Path(str(files("mlpe.agent") / "scenarios" / name))


def load(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ScenarioError(f"{path}: cannot read scenario: {err.strerror}") from None
    return parse(text, str(path))
