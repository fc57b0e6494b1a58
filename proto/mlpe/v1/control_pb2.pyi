from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_PAUSED: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_PAUSED: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class ModelSpec(_message.Message):
    __slots__ = ("preset", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len", "tied", "hf_config", "hf_pretrained", "hf_mlpe_kernels")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    FFN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    TIED_FIELD_NUMBER: _ClassVar[int]
    HF_CONFIG_FIELD_NUMBER: _ClassVar[int]
    HF_PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    HF_MLPE_KERNELS_FIELD_NUMBER: _ClassVar[int]
    preset: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq_len: int
    tied: bool
    hf_config: str
    hf_pretrained: str
    hf_mlpe_kernels: bool
    def __init__(self, preset: _Optional[str] = ..., layers: _Optional[int] = ..., hidden: _Optional[int] = ..., heads: _Optional[int] = ..., kv_heads: _Optional[int] = ..., ffn: _Optional[int] = ..., vocab: _Optional[int] = ..., seq_len: _Optional[int] = ..., tied: _Optional[bool] = ..., hf_config: _Optional[str] = ..., hf_pretrained: _Optional[str] = ..., hf_mlpe_kernels: _Optional[bool] = ...) -> None: ...

class ParallelismSpec(_message.Message):
    __slots__ = ("kind", "reshard_after_forward", "cpu_offload")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RESHARD_AFTER_FORWARD_FIELD_NUMBER: _ClassVar[int]
    CPU_OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    kind: str
    reshard_after_forward: bool
    cpu_offload: bool
    def __init__(self, kind: _Optional[str] = ..., reshard_after_forward: _Optional[bool] = ..., cpu_offload: _Optional[bool] = ...) -> None: ...

class DataSpec(_message.Message):
    __slots__ = ("kind", "path", "dtype", "seed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    path: str
    dtype: str
    seed: int
    def __init__(self, kind: _Optional[str] = ..., path: _Optional[str] = ..., dtype: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("name", "lr", "weight_decay", "beta1", "beta2", "eps", "schedule", "warmup_steps", "min_lr_ratio", "grad_clip")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    schedule: str
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., schedule: _Optional[str] = ..., warmup_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ..., grad_clip: _Optional[float] = ...) -> None: ...

class CheckpointPolicy(_message.Message):
    __slots__ = ("every_steps", "every_seconds", "keep")
    EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    every_steps: int
    every_seconds: float
    keep: int
    def __init__(self, every_steps: _Optional[int] = ..., every_seconds: _Optional[float] = ..., keep: _Optional[int] = ...) -> None: ...

class Entrypoint(_message.Message):
    __slots__ = ("script", "module", "args", "working_dir", "env", "nproc_per_node")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SCRIPT_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    NPROC_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    script: str
    module: str
    args: _containers.RepeatedScalarFieldContainer[str]
    working_dir: str
    env: _containers.ScalarMap[str, str]
    nproc_per_node: int
    def __init__(self, script: _Optional[str] = ..., module: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., working_dir: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., nproc_per_node: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "model", "data", "steps", "global_batch", "micro_batch", "precision", "recompute", "optimizer", "checkpoint", "world_size", "priority", "max_restarts", "hang_timeout_s", "device", "seed", "kernel_report_steps", "entrypoint", "parallelism", "budget", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    HANG_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KERNEL_REPORT_STEPS_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: ModelSpec
    data: DataSpec
    steps: int
    global_batch: int
    micro_batch: int
    precision: str
    recompute: str
    optimizer: OptimizerSpec
    checkpoint: CheckpointPolicy
    world_size: int
    priority: int
    max_restarts: int
    hang_timeout_s: float
    device: str
    seed: int
    kernel_report_steps: int
    entrypoint: Entrypoint
    parallelism: ParallelismSpec
    budget: Budget
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., data: _Optional[_Union[DataSpec, _Mapping]] = ..., steps: _Optional[int] = ..., global_batch: _Optional[int] = ..., micro_batch: _Optional[int] = ..., precision: _Optional[str] = ..., recompute: _Optional[str] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointPolicy, _Mapping]] = ..., world_size: _Optional[int] = ..., priority: _Optional[int] = ..., max_restarts: _Optional[int] = ..., hang_timeout_s: _Optional[float] = ..., device: _Optional[str] = ..., seed: _Optional[int] = ..., kernel_report_steps: _Optional[int] = ..., entrypoint: _Optional[_Union[Entrypoint, _Mapping]] = ..., parallelism: _Optional[_Union[ParallelismSpec, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("amount", "policy")
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    amount: float
    policy: str
    def __init__(self, amount: _Optional[float] = ..., policy: _Optional[str] = ...) -> None: ...

class JobCost(_message.Message):
    __slots__ = ("job_id", "name", "time_ns", "gpus", "gpu_type", "pricing", "price_per_gpu_hour", "currency", "useful_s", "failure_s", "paused_s", "gpu_hours", "total", "useful", "failure", "paused", "phase", "budget")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    PRICING_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    USEFUL_S_FIELD_NUMBER: _ClassVar[int]
    FAILURE_S_FIELD_NUMBER: _ClassVar[int]
    PAUSED_S_FIELD_NUMBER: _ClassVar[int]
    GPU_HOURS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    USEFUL_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    time_ns: int
    gpus: int
    gpu_type: str
    pricing: str
    price_per_gpu_hour: float
    currency: str
    useful_s: float
    failure_s: float
    paused_s: float
    gpu_hours: float
    total: float
    useful: float
    failure: float
    paused: float
    phase: str
    budget: float
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., time_ns: _Optional[int] = ..., gpus: _Optional[int] = ..., gpu_type: _Optional[str] = ..., pricing: _Optional[str] = ..., price_per_gpu_hour: _Optional[float] = ..., currency: _Optional[str] = ..., useful_s: _Optional[float] = ..., failure_s: _Optional[float] = ..., paused_s: _Optional[float] = ..., gpu_hours: _Optional[float] = ..., total: _Optional[float] = ..., useful: _Optional[float] = ..., failure: _Optional[float] = ..., paused: _Optional[float] = ..., phase: _Optional[str] = ..., budget: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "spec", "state", "step", "checkpoint_step", "restarts", "submitted_ns", "started_ns", "ended_ns", "message", "loss", "tokens_per_s", "queue_position", "cost")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_NS_FIELD_NUMBER: _ClassVar[int]
    STARTED_NS_FIELD_NUMBER: _ClassVar[int]
    ENDED_NS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    state: JobState
    step: int
    checkpoint_step: int
    restarts: int
    submitted_ns: int
    started_ns: int
    ended_ns: int
    message: str
    loss: float
    tokens_per_s: float
    queue_position: int
    cost: JobCost
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[int] = ..., checkpoint_step: _Optional[int] = ..., restarts: _Optional[int] = ..., submitted_ns: _Optional[int] = ..., started_ns: _Optional[int] = ..., ended_ns: _Optional[int] = ..., message: _Optional[str] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., queue_position: _Optional[int] = ..., cost: _Optional[_Union[JobCost, _Mapping]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "limit")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    limit: int
    def __init__(self, states: _Optional[_Iterable[_Union[JobState, str]]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class StreamJobEventsRequest(_message.Message):
    __slots__ = ("job_id", "after_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_id: str
    def __init__(self, job_id: _Optional[str] = ..., after_id: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("id", "job_id", "time_ns", "kind", "state", "step", "loss", "message", "cost")
    ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    id: str
    job_id: str
    time_ns: int
    kind: str
    state: JobState
    step: int
    loss: float
    message: str
    cost: JobCost
    def __init__(self, id: _Optional[str] = ..., job_id: _Optional[str] = ..., time_ns: _Optional[int] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., message: _Optional[str] = ..., cost: _Optional[_Union[JobCost, _Mapping]] = ...) -> None: ...
