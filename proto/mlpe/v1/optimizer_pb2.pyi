from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelShape(_message.Message):
    __slots__ = ("preset", "layers", "hidden", "heads", "kv_heads", "ffn", "ffn_type", "vocab", "seq_len", "tied", "experts", "top_k")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    FFN_FIELD_NUMBER: _ClassVar[int]
    FFN_TYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    TIED_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    preset: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    ffn_type: str
    vocab: int
    seq_len: int
    tied: bool
    experts: int
    top_k: int
    def __init__(self, preset: _Optional[str] = ..., layers: _Optional[int] = ..., hidden: _Optional[int] = ..., heads: _Optional[int] = ..., kv_heads: _Optional[int] = ..., ffn: _Optional[int] = ..., ffn_type: _Optional[str] = ..., vocab: _Optional[int] = ..., seq_len: _Optional[int] = ..., tied: _Optional[bool] = ..., experts: _Optional[int] = ..., top_k: _Optional[int] = ...) -> None: ...

class ClusterSpec(_message.Message):
    __slots__ = ("preset", "nodes", "gpus_per_node", "gpu", "intra_node_gbps", "inter_node_gbps", "pricing")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    INTRA_NODE_GBPS_FIELD_NUMBER: _ClassVar[int]
    INTER_NODE_GBPS_FIELD_NUMBER: _ClassVar[int]
    PRICING_FIELD_NUMBER: _ClassVar[int]
    preset: str
    nodes: int
    gpus_per_node: int
    gpu: str
    intra_node_gbps: float
    inter_node_gbps: float
    pricing: str
    def __init__(self, preset: _Optional[str] = ..., nodes: _Optional[int] = ..., gpus_per_node: _Optional[int] = ..., gpu: _Optional[str] = ..., intra_node_gbps: _Optional[float] = ..., inter_node_gbps: _Optional[float] = ..., pricing: _Optional[str] = ...) -> None: ...

class TrainingSpec(_message.Message):
    __slots__ = ("global_batch", "seq_len", "precision", "optimizer", "objective")
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    global_batch: int
    seq_len: int
    precision: str
    optimizer: str
    objective: str
    def __init__(self, global_batch: _Optional[int] = ..., seq_len: _Optional[int] = ..., precision: _Optional[str] = ..., optimizer: _Optional[str] = ..., objective: _Optional[str] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("model", "cluster", "training", "top_k", "layout")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    model: ModelShape
    cluster: ClusterSpec
    training: TrainingSpec
    top_k: int
    layout: str
    def __init__(self, model: _Optional[_Union[ModelShape, _Mapping]] = ..., cluster: _Optional[_Union[ClusterSpec, _Mapping]] = ..., training: _Optional[_Union[TrainingSpec, _Mapping]] = ..., top_k: _Optional[int] = ..., layout: _Optional[str] = ...) -> None: ...

class MemoryBreakdown(_message.Message):
    __slots__ = ("params_gib", "grads_gib", "optimizer_gib", "activations_gib", "pipeline_inflight_gib", "temporary_gib", "reserve_gib", "total_gib", "capacity_gib")
    PARAMS_GIB_FIELD_NUMBER: _ClassVar[int]
    GRADS_GIB_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_GIB_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_GIB_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_INFLIGHT_GIB_FIELD_NUMBER: _ClassVar[int]
    TEMPORARY_GIB_FIELD_NUMBER: _ClassVar[int]
    RESERVE_GIB_FIELD_NUMBER: _ClassVar[int]
    TOTAL_GIB_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_GIB_FIELD_NUMBER: _ClassVar[int]
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    pipeline_inflight_gib: float
    temporary_gib: float
    reserve_gib: float
    total_gib: float
    capacity_gib: float
    def __init__(self, params_gib: _Optional[float] = ..., grads_gib: _Optional[float] = ..., optimizer_gib: _Optional[float] = ..., activations_gib: _Optional[float] = ..., pipeline_inflight_gib: _Optional[float] = ..., temporary_gib: _Optional[float] = ..., reserve_gib: _Optional[float] = ..., total_gib: _Optional[float] = ..., capacity_gib: _Optional[float] = ...) -> None: ...

class StepTime(_message.Message):
    __slots__ = ("compute_s", "comm_exposed_s", "bubble_s", "total_s")
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    COMM_EXPOSED_S_FIELD_NUMBER: _ClassVar[int]
    BUBBLE_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    compute_s: float
    comm_exposed_s: float
    bubble_s: float
    total_s: float
    def __init__(self, compute_s: _Optional[float] = ..., comm_exposed_s: _Optional[float] = ..., bubble_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("dp", "tp", "pp", "cp", "ep", "sequence_parallel", "zero_stage", "fsdp", "micro_batch", "grad_accum", "recompute", "offload", "memory", "time", "tokens_per_s", "mfu", "fits", "summary", "cost_per_step", "cost_per_billion_tokens", "currency")
    DP_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    CP_FIELD_NUMBER: _ClassVar[int]
    EP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    ZERO_STAGE_FIELD_NUMBER: _ClassVar[int]
    FSDP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MFU_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    COST_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    COST_PER_BILLION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    dp: int
    tp: int
    pp: int
    cp: int
    ep: int
    sequence_parallel: bool
    zero_stage: int
    fsdp: bool
    micro_batch: int
    grad_accum: int
    recompute: str
    offload: str
    memory: MemoryBreakdown
    time: StepTime
    tokens_per_s: float
    mfu: float
    fits: bool
    summary: str
    cost_per_step: float
    cost_per_billion_tokens: float
    currency: str
    def __init__(self, dp: _Optional[int] = ..., tp: _Optional[int] = ..., pp: _Optional[int] = ..., cp: _Optional[int] = ..., ep: _Optional[int] = ..., sequence_parallel: _Optional[bool] = ..., zero_stage: _Optional[int] = ..., fsdp: _Optional[bool] = ..., micro_batch: _Optional[int] = ..., grad_accum: _Optional[int] = ..., recompute: _Optional[str] = ..., offload: _Optional[str] = ..., memory: _Optional[_Union[MemoryBreakdown, _Mapping]] = ..., time: _Optional[_Union[StepTime, _Mapping]] = ..., tokens_per_s: _Optional[float] = ..., mfu: _Optional[float] = ..., fits: _Optional[bool] = ..., summary: _Optional[str] = ..., cost_per_step: _Optional[float] = ..., cost_per_billion_tokens: _Optional[float] = ..., currency: _Optional[str] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("layout", "reason")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    layout: str
    reason: str
    def __init__(self, layout: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("plans", "rejected", "closest", "suggestions", "search_ms", "cached", "request_hash", "evaluated", "problems", "nearest")
    PLANS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CLOSEST_FIELD_NUMBER: _ClassVar[int]
    SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_HASH_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    NEAREST_FIELD_NUMBER: _ClassVar[int]
    plans: _containers.RepeatedCompositeFieldContainer[Plan]
    rejected: _containers.RepeatedCompositeFieldContainer[Rejection]
    closest: Plan
    suggestions: _containers.RepeatedScalarFieldContainer[str]
    search_ms: float
    cached: bool
    request_hash: str
    evaluated: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    nearest: _containers.RepeatedCompositeFieldContainer[Plan]
    def __init__(self, plans: _Optional[_Iterable[_Union[Plan, _Mapping]]] = ..., rejected: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., closest: _Optional[_Union[Plan, _Mapping]] = ..., suggestions: _Optional[_Iterable[str]] = ..., search_ms: _Optional[float] = ..., cached: _Optional[bool] = ..., request_hash: _Optional[str] = ..., evaluated: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ..., nearest: _Optional[_Iterable[_Union[Plan, _Mapping]]] = ...) -> None: ...

class ExplainPlanRequest(_message.Message):
    __slots__ = ("request", "plan")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    request: PlanRequest
    plan: Plan
    def __init__(self, request: _Optional[_Union[PlanRequest, _Mapping]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class ExplainPlanResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class AdviseJobRequest(_message.Message):
    __slots__ = ("job_id", "window_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    window_s: int
    def __init__(self, job_id: _Optional[str] = ..., window_s: _Optional[int] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("title", "evidence", "severity", "expected_gain_pct")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_GAIN_PCT_FIELD_NUMBER: _ClassVar[int]
    title: str
    evidence: str
    severity: str
    expected_gain_pct: float
    def __init__(self, title: _Optional[str] = ..., evidence: _Optional[str] = ..., severity: _Optional[str] = ..., expected_gain_pct: _Optional[float] = ...) -> None: ...

class AdviseJobResponse(_message.Message):
    __slots__ = ("job_id", "recommendations", "summary")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    recommendations: _containers.RepeatedCompositeFieldContainer[Recommendation]
    summary: str
    def __init__(self, job_id: _Optional[str] = ..., recommendations: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., summary: _Optional[str] = ...) -> None: ...
