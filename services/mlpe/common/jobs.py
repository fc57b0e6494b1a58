"""The job contract that control, the worker and the optimizer share.

- `GPTConfig` and `PRESETS`: the worker's model shapes, without torch (the controller
  validates specs with them and must start quickly; the optimizer models them).
- `resolve(spec)`: a JobSpec with its defaults filled in and every bad field named, as
  the plain dict the worker runs; `model_config` turns it into a GPTConfig (for a
  Hugging Face model, `hf`, only its seq_len counts). A script job (`entrypoint`) keeps
  the built-in fields at their defaults, unused.
- `JobKeys`: the Redis keys the controller and its workers share, under a namespace
  (Settings.control_namespace) so controllers sharing one Redis keep apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from google.protobuf import json_format

from mlpe.v1 import control_pb2

RECOMPUTE = ("none", "full")



@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 512
    seq_len: int = 128
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 4
    ffn: int = 0  # 0: about 8/3 of hidden, a multiple of 64 (Llama's choice)
    tied: bool = False
    recompute: str = "none"  # "full": each block's activations recomputed in backward

    def __post_init__(self):
        for name in ("vocab", "seq_len", "layers", "hidden", "heads", "kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.ffn < 0:
            raise ValueError(f"model.ffn must be ≥ 0, got {self.ffn}")
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden {self.hidden} is not divisible by model.heads "
                             f"{self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"model.heads {self.heads} is not divisible by model.kv_heads "
                             f"{self.kv_heads}")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"head size hidden/heads = {self.hidden // self.heads} must be "
                             "even for rotary embeddings")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"model.recompute must be one of {', '.join(RECOMPUTE)}, got "
                             f"{self.recompute!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def ffn_size(self) -> int:
        return self.ffn or 64 * math.ceil(self.hidden * 8 / 3 / 64)


PRESETS = {
    "tiny": GPTConfig(vocab=256, seq_len=32, layers=2, hidden=64, heads=4, kv_heads=2),
    "small": GPTConfig(),
    "gpt-30m": GPTConfig(vocab=32000, seq_len=512, layers=6, hidden=384, heads=6, kv_heads=6),
    "gpt-125m": GPTConfig(vocab=50304, seq_len=1024, layers=12, hidden=768, heads=12,
                          kv_heads=12, ffn=2048, tied=True),
}


# -- specs ---------------------------------------------------------------------------------
# `resolve(spec)` returns (resolved dict, problems); problems are "field: reason" strings,
# all of them at once, so one INVALID_ARGUMENT tells the user everything to fix.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "constant")
MAX_STEPS = 10_000_000
BUDGET_POLICIES = ("pause", "stop", "warn")  # what a job's budget does at 100 %
MAX_BUDGET = 1e9
LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")  # key and value
MAX_LABELS = 16


def _model(m: control_pb2.ModelSpec, recompute: str, problems: list[str]) -> dict:
    if m.preset and m.preset not in PRESETS:
        problems.append(f"model.preset: unknown {m.preset!r}; one of {', '.join(PRESETS)}")
        base = GPTConfig()
    else:
        base = PRESETS[m.preset] if m.preset else GPTConfig()
    fields = {}
    for name in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len"):
        value = getattr(m, name)
        if value < 0:
            problems.append(f"model.{name}: must be ≥ 0 (0 = the preset's), got {value}")
        fields[name] = value if value > 0 else getattr(base, name)
    fields["tied"] = m.tied or base.tied
    fields["recompute"] = recompute
    try:
        GPTConfig(**fields)
    except ValueError as err:
        problems.append(str(err))
    return fields


PARALLELISMS = ("ddp", "fsdp")
GPT_DIMENSIONS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab")


def _hf(m: control_pb2.ModelSpec, problems: list[str]) -> dict | None:
    """A Hugging Face model's source, or None for the built-in GPT. An inline config is
    parsed here; a config path or pretrained folder is checked by the controller (its
    filesystem, its allowed roots) and read by the worker."""
    if not (m.hf_config or m.hf_pretrained):
        if m.HasField("hf_mlpe_kernels"):
            problems.append("model.hf_mlpe_kernels: only with model.hf_config or "
                            "model.hf_pretrained")
        return None
    if m.hf_config and m.hf_pretrained:
        problems.append("model: one of hf_config and hf_pretrained, got both")
    if m.preset or m.tied or any(getattr(m, name) for name in GPT_DIMENSIONS):
        problems.append("model: a Hugging Face model takes its shape from its config; "
                        "leave preset, tied and " + ", ".join(GPT_DIMENSIONS) +
                        " unset (seq_len is allowed)")
    inline = None
    if m.hf_config.lstrip().startswith("{"):
        try:
            inline = json.loads(m.hf_config)
        except ValueError as err:
            problems.append(f"model.hf_config: not valid JSON: {err}")
        else:
            if not isinstance(inline, dict) or not isinstance(inline.get("model_type"), str):
                problems.append('model.hf_config: a JSON object with a "model_type" (e.g. '
                                '"llama"), as in a config.json')
                inline = None
    return {"config": inline, "config_path": "" if inline is not None or
            m.hf_config.lstrip().startswith("{") else m.hf_config,
            "pretrained": m.hf_pretrained,
            "mlpe_kernels": m.hf_mlpe_kernels if m.HasField("hf_mlpe_kernels") else True}


def _parallelism(spec: control_pb2.JobSpec, problems: list[str]) -> dict:
    p = spec.parallelism
    kind = p.kind or "ddp"
    if kind not in PARALLELISMS:
        problems.append(f"parallelism.kind: one of {', '.join(PARALLELISMS)}, got {kind!r}")
    if kind != "fsdp" and (p.HasField("reshard_after_forward") or p.cpu_offload):
        problems.append("parallelism: reshard_after_forward and cpu_offload are FSDP "
                        "choices; set kind 'fsdp'")
    return {"kind": kind, "cpu_offload": p.cpu_offload,
            "reshard_after_forward": p.reshard_after_forward
            if p.HasField("reshard_after_forward") else True}


# Set by the launcher for every rank; a script job's env may not override them.
RESERVED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "PYTHONPATH")
BUILTIN_ONLY = ("model", "data", "optimizer", "global_batch", "micro_batch", "precision",
                "recompute", "seed", "parallelism")


def _entrypoint(spec: control_pb2.JobSpec, world: int, problems: list[str]) -> dict | None:
    """A script job's entry point (paths are checked by the controller, which knows its
    filesystem and allowed roots), or None for the built-in model."""
    if not spec.HasField("entrypoint"):
        return None
    e = spec.entrypoint
    for name in BUILTIN_ONLY:
        present = spec.HasField(name) if name in ("model", "data", "optimizer",
                                                  "parallelism") else \
            bool(getattr(spec, name))
        if present:
            problems.append(f"{name}: only for the built-in model; a script job "
                            "(entrypoint) brings its own")
    if bool(e.script) == bool(e.module):
        problems.append("entrypoint: exactly one of script and module, got "
                        + ("both" if e.script else "neither"))
    if e.module and not all(part.isidentifier() for part in e.module.split(".")):
        problems.append(f"entrypoint.module: {e.module!r} is not a dotted module name")
    if e.module and not e.working_dir:
        problems.append("entrypoint.working_dir: required with entrypoint.module")
    for i, arg in enumerate(e.args):
        if "\0" in arg:
            problems.append(f"entrypoint.args[{i}]: contains a NUL byte")
    for key, value in e.env.items():
        if not key.isidentifier() or not key.isascii():
            problems.append(f"entrypoint.env: {key!r} is not a variable name")
        elif key in RESERVED_ENV or key.startswith(("MLPE_", "TORCHELASTIC_")):
            problems.append(f"entrypoint.env: {key} is set by mlpe's launcher")
        if "\0" in value:
            problems.append(f"entrypoint.env[{key}]: contains a NUL byte")
    if e.nproc_per_node < 0 or e.nproc_per_node not in (0, world):
        problems.append(f"entrypoint.nproc_per_node: this controller launches one node, so "
                        f"it must be 0 or world_size ({world}), got {e.nproc_per_node}")
    return {"script": e.script, "module": e.module, "args": list(e.args),
            "working_dir": e.working_dir, "env": dict(e.env), "nproc_per_node": world}


def resolve(spec: control_pb2.JobSpec) -> tuple[dict, list[str]]:
    problems: list[str] = []
    entrypoint = _entrypoint(spec, spec.world_size or 1, problems)
    recompute = spec.recompute or "none"
    if recompute not in RECOMPUTE:
        problems.append(f"recompute: one of {', '.join(RECOMPUTE)}, got {recompute!r}")
        recompute = "none"
    hf = _hf(spec.model, problems)
    model = _model(control_pb2.ModelSpec(seq_len=spec.model.seq_len) if hf else spec.model,
                   recompute, problems)
    parallelism = _parallelism(spec, problems)

    data = {"kind": spec.data.kind or "synthetic", "path": spec.data.path,
            "dtype": spec.data.dtype or "uint16", "seed": spec.data.seed}
    if data["kind"] not in ("synthetic", "file"):
        problems.append(f"data.kind: 'synthetic' or 'file', got {data['kind']!r}")
    elif data["kind"] == "file" and not data["path"]:
        problems.append("data.path: required when data.kind is 'file'")
    if data["dtype"] not in ("uint16", "uint32"):
        problems.append(f"data.dtype: 'uint16' or 'uint32', got {data['dtype']!r}")

    world = spec.world_size or 1
    micro = spec.micro_batch or 1
    global_batch = spec.global_batch or micro * world
    if entrypoint is not None and spec.steps == 0:
        pass  # a script decides how long it runs
    elif not 1 <= spec.steps <= MAX_STEPS:
        problems.append(f"steps: between 1 and {MAX_STEPS:,}, got {spec.steps}")
    if world < 1 or world > 64:
        problems.append(f"world_size: between 1 and 64, got {spec.world_size}")
    if micro < 1:
        problems.append(f"micro_batch: must be ≥ 1, got {spec.micro_batch}")
    if global_batch < 1:
        problems.append(f"global_batch: must be ≥ 1, got {spec.global_batch}")
    elif world >= 1 and micro >= 1 and global_batch % (micro * world):
        problems.append(f"global_batch: {global_batch} is not a multiple of micro_batch * "
                        f"world_size = {micro * world}")
    precision = spec.precision or "fp32"
    if precision not in PRECISIONS:
        problems.append(f"precision: one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = spec.device or "auto"
    if device not in DEVICES:
        problems.append(f"device: one of {', '.join(DEVICES)}, got {device!r}")
    if parallelism["cpu_offload"] and device == "cpu":
        problems.append("parallelism.cpu_offload: offloads GPU memory to the host; needs "
                        "device cuda (or auto on a GPU machine)")
    if precision == "bf16" and device == "cpu":
        problems.append("precision: bf16 mixed precision needs device cuda (or auto on a "
                        "GPU machine)")

    o = spec.optimizer
    optimizer = {"name": o.name or "adamw", "lr": o.lr or 3e-4,
                 "weight_decay": o.weight_decay if o.HasField("weight_decay") else 0.1,
                 "beta1": o.beta1 or 0.9, "beta2": o.beta2 or 0.95, "eps": o.eps or 1e-8,
                 "schedule": o.schedule or "cosine", "warmup_steps": o.warmup_steps,
                 "min_lr_ratio": o.min_lr_ratio if o.HasField("min_lr_ratio") else 0.1,
                 "grad_clip": o.grad_clip or 1.0}
    if optimizer["name"] != "adamw":
        problems.append(f"optimizer.name: only 'adamw', got {optimizer['name']!r}")
    if optimizer["schedule"] not in SCHEDULES:
        problems.append(f"optimizer.schedule: one of {', '.join(SCHEDULES)}, got "
                        f"{optimizer['schedule']!r}")
    for name, low, high in (("lr", 0, 10), ("weight_decay", 0, 10), ("beta1", 0, 1),
                            ("beta2", 0, 1), ("eps", 0, 1), ("min_lr_ratio", 0, 1)):
        value = optimizer[name]
        if not low <= value <= high or (name.startswith("beta") and value >= 1):
            problems.append(f"optimizer.{name}: must be in [{low}, {high}"
                            f"{')' if name.startswith('beta') else ']'}, got {value}")
    if optimizer["warmup_steps"] < 0:
        problems.append(f"optimizer.warmup_steps: must be ≥ 0, got {o.warmup_steps}")

    c = spec.checkpoint
    checkpoint = {"every_steps": c.every_steps, "every_seconds": c.every_seconds,
                  "keep": c.keep or 3}
    if c.every_steps < 0 or c.every_seconds < 0 or c.keep < 0:
        problems.append("checkpoint: every_steps, every_seconds and keep must be ≥ 0")
    if spec.max_restarts < 0 or spec.max_restarts > 1000:
        problems.append(f"max_restarts: between 0 and 1000, got {spec.max_restarts}")
    hang = spec.hang_timeout_s or 120.0
    if hang < 1:
        problems.append(f"hang_timeout_s: at least 1 s, got {spec.hang_timeout_s}")
    if spec.kernel_report_steps < 0:
        problems.append(f"kernel_report_steps: must be ≥ 0, got {spec.kernel_report_steps}")
    if len(spec.name) > 200:
        problems.append("name: at most 200 characters")
    if len(spec.labels) > MAX_LABELS:
        problems.append(f"labels: at most {MAX_LABELS}, got {len(spec.labels)}")
    for key, value in sorted(spec.labels.items()):
        if not (LABEL.fullmatch(key) and LABEL.fullmatch(value)):
            problems.append(f"labels: {key[:40]!r}: {value[:40]!r}: keys and values are "
                            "1-63 letters, digits and ._/- starting and ending with a letter "
                            "or digit")
    budget = {"amount": spec.budget.amount, "policy": spec.budget.policy or "pause"}
    if not (math.isfinite(budget["amount"]) and 0 <= budget["amount"] <= MAX_BUDGET):
        problems.append(f"budget.amount: between 0 (none) and {MAX_BUDGET:,.0f}, got "
                        f"{spec.budget.amount}")
    if budget["policy"] not in BUDGET_POLICIES:
        problems.append(f"budget.policy: one of {', '.join(BUDGET_POLICIES)}, got "
                        f"{spec.budget.policy!r}")

    resolved = {"name": spec.name, "model": model, "data": data, "steps": spec.steps,
                "global_batch": global_batch, "micro_batch": micro,
                "world_size": world, "precision": precision, "recompute": recompute,
                "optimizer": optimizer, "checkpoint": checkpoint,
                "priority": spec.priority, "max_restarts": spec.max_restarts,
                "hang_timeout_s": hang, "device": device, "seed": spec.seed,
                "kernel_report_steps": spec.kernel_report_steps, "entrypoint": entrypoint,
                "hf": hf, "parallelism": parallelism, "budget": budget,
                "labels": dict(spec.labels)}
    return resolved, problems


def model_config(resolved: dict) -> GPTConfig:
    return GPTConfig(**resolved["model"])


def to_json(spec: control_pb2.JobSpec) -> str:
    return json_format.MessageToJson(spec, indent=None, preserving_proto_field_name=True)


def from_json(text: str) -> control_pb2.JobSpec:
    return json_format.Parse(text, control_pb2.JobSpec())


# -- Redis keys ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JobKeys:
    """Redis keys of one controller namespace (workers inherit it from the controller)."""

    namespace: str = "mlpe"

    @property
    def jobs(self) -> str:
        """sorted set: job id by submit time (ns)"""
        return f"{self.namespace}:jobs"

    @property
    def queue(self) -> str:
        """sorted set: queued job ids, lowest score runs first"""
        return f"{self.namespace}:queue"

    @property
    def label_budgets(self) -> str:
        """hash: label budget (key=value) -> the alert level it reached (1: 80 %, 2: 100 %)"""
        return f"{self.namespace}:label-budgets"

    @property
    def audit(self) -> str:
        """stream: every state-changing call (who, what, when)"""
        return f"{self.namespace}:audit"

    @property
    def seq(self) -> str:
        """counter: submit order, breaks priority ties"""
        return f"{self.namespace}:job-seq"

    def job(self, job_id: str) -> str:
        """hash: spec (JSON), state, step, restarts, times, message, launch (pid, start)."""
        return f"{self.namespace}:job:{job_id}"

    def ranks(self, job_id: str) -> str:
        """hash: rank -> JSON progress {step, time_ns, pid, loss, …}, written by each worker."""
        return f"{self.namespace}:job:{job_id}:ranks"

    def control(self, job_id: str) -> str:
        """hash: pause (0/1), stop (0/1), checkpoint (request counter), read by rank 0."""
        return f"{self.namespace}:job:{job_id}:control"

    def events(self, job_id: str) -> str:
        """stream: the job's events (state changes, steps, checkpoints, restarts)."""
        return f"{self.namespace}:job:{job_id}:events"
