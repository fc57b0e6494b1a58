from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainStep(_message.Message):
    __slots__ = ("job_id", "rank", "world_size", "step", "time_ns", "loss", "tokens_per_s", "step_time_s", "mem_allocated_bytes", "mem_reserved_bytes", "grad_norm", "learning_rate", "node_id", "gpu_index", "micro_batches", "halt", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    MEM_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    HALT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    world_size: int
    step: int
    time_ns: int
    loss: float
    tokens_per_s: float
    step_time_s: float
    mem_allocated_bytes: int
    mem_reserved_bytes: int
    grad_norm: float
    learning_rate: float
    node_id: str
    gpu_index: int
    micro_batches: int
    halt: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., step: _Optional[int] = ..., time_ns: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., step_time_s: _Optional[float] = ..., mem_allocated_bytes: _Optional[int] = ..., mem_reserved_bytes: _Optional[int] = ..., grad_norm: _Optional[float] = ..., learning_rate: _Optional[float] = ..., node_id: _Optional[str] = ..., gpu_index: _Optional[int] = ..., micro_batches: _Optional[int] = ..., halt: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class KernelTiming(_message.Message):
    __slots__ = ("op", "direction", "calls", "total_ms", "p50_ms", "p99_ms", "max_ms", "bytes_moved")
    OP_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    op: str
    direction: str
    calls: int
    total_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    bytes_moved: float
    def __init__(self, op: _Optional[str] = ..., direction: _Optional[str] = ..., calls: _Optional[int] = ..., total_ms: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., max_ms: _Optional[float] = ..., bytes_moved: _Optional[float] = ...) -> None: ...

class KernelSummary(_message.Message):
    __slots__ = ("job_id", "rank", "first_step", "last_step", "time_ns", "backend", "kernels")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    first_step: int
    last_step: int
    time_ns: int
    backend: str
    kernels: _containers.RepeatedCompositeFieldContainer[KernelTiming]
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., first_step: _Optional[int] = ..., last_step: _Optional[int] = ..., time_ns: _Optional[int] = ..., backend: _Optional[str] = ..., kernels: _Optional[_Iterable[_Union[KernelTiming, _Mapping]]] = ...) -> None: ...

class JobPlacement(_message.Message):
    __slots__ = ("job_id", "node_id", "time_ns", "ranks", "ended")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    node_id: str
    time_ns: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankProcess]
    ended: bool
    def __init__(self, job_id: _Optional[str] = ..., node_id: _Optional[str] = ..., time_ns: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankProcess, _Mapping]]] = ..., ended: _Optional[bool] = ...) -> None: ...

class RankProcess(_message.Message):
    __slots__ = ("rank", "local_rank", "pid")
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    rank: int
    local_rank: int
    pid: int
    def __init__(self, rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...
