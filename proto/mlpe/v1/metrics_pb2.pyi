from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Field(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIELD_UNSPECIFIED: _ClassVar[Field]
    GPU_UTIL: _ClassVar[Field]
    GPU_MEM_UTIL: _ClassVar[Field]
    GPU_MEM_USED: _ClassVar[Field]
    GPU_MEM_TOTAL: _ClassVar[Field]
    GPU_POWER: _ClassVar[Field]
    GPU_ENERGY: _ClassVar[Field]
    GPU_TEMP: _ClassVar[Field]
    GPU_MEM_TEMP: _ClassVar[Field]
    GPU_SM_CLOCK: _ClassVar[Field]
    GPU_MEM_CLOCK: _ClassVar[Field]
    GPU_THROTTLE_REASONS: _ClassVar[Field]
    GPU_PCIE_TX: _ClassVar[Field]
    GPU_PCIE_RX: _ClassVar[Field]
    GPU_NVLINK_TX: _ClassVar[Field]
    GPU_NVLINK_RX: _ClassVar[Field]
    GPU_ECC_CORRECTED: _ClassVar[Field]
    GPU_ECC_UNCORRECTED: _ClassVar[Field]
    GPU_POWER_LIMIT: _ClassVar[Field]
    GPU_SM_CLOCK_MAX: _ClassVar[Field]
    HOST_CPU_UTIL: _ClassVar[Field]
    HOST_MEM_USED: _ClassVar[Field]
    HOST_MEM_TOTAL: _ClassVar[Field]
    HOST_DISK_READ: _ClassVar[Field]
    HOST_DISK_WRITE: _ClassVar[Field]
    HOST_NET_RX: _ClassVar[Field]
    HOST_NET_TX: _ClassVar[Field]
    HOST_LOAD1: _ClassVar[Field]

class ThrottleReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THROTTLE_NONE: _ClassVar[ThrottleReason]
    THROTTLE_GPU_IDLE: _ClassVar[ThrottleReason]
    THROTTLE_APPLICATIONS_CLOCKS: _ClassVar[ThrottleReason]
    THROTTLE_SW_POWER_CAP: _ClassVar[ThrottleReason]
    THROTTLE_HW_SLOWDOWN: _ClassVar[ThrottleReason]
    THROTTLE_SYNC_BOOST: _ClassVar[ThrottleReason]
    THROTTLE_SW_THERMAL: _ClassVar[ThrottleReason]
    THROTTLE_HW_THERMAL: _ClassVar[ThrottleReason]
    THROTTLE_HW_POWER_BRAKE: _ClassVar[ThrottleReason]
    THROTTLE_DISPLAY_CLOCKS: _ClassVar[ThrottleReason]

class DeviceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_KIND_UNSPECIFIED: _ClassVar[DeviceKind]
    DEVICE_KIND_GPU: _ClassVar[DeviceKind]
    DEVICE_KIND_HOST: _ClassVar[DeviceKind]

class ValueType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALUE_TYPE_UNSPECIFIED: _ClassVar[ValueType]
    VALUE_TYPE_F32: _ClassVar[ValueType]
    VALUE_TYPE_F64: _ClassVar[ValueType]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_XID: _ClassVar[EventKind]
    EVENT_ECC_UNCORRECTED: _ClassVar[EventKind]
    EVENT_THROTTLE: _ClassVar[EventKind]
    EVENT_GPU_LOST: _ClassVar[EventKind]
    EVENT_GPU_RECOVERED: _ClassVar[EventKind]
    EVENT_PROCESS_MEMORY: _ClassVar[EventKind]
FIELD_UNSPECIFIED: Field
GPU_UTIL: Field
GPU_MEM_UTIL: Field
GPU_MEM_USED: Field
GPU_MEM_TOTAL: Field
GPU_POWER: Field
GPU_ENERGY: Field
GPU_TEMP: Field
GPU_MEM_TEMP: Field
GPU_SM_CLOCK: Field
GPU_MEM_CLOCK: Field
GPU_THROTTLE_REASONS: Field
GPU_PCIE_TX: Field
GPU_PCIE_RX: Field
GPU_NVLINK_TX: Field
GPU_NVLINK_RX: Field
GPU_ECC_CORRECTED: Field
GPU_ECC_UNCORRECTED: Field
GPU_POWER_LIMIT: Field
GPU_SM_CLOCK_MAX: Field
HOST_CPU_UTIL: Field
HOST_MEM_USED: Field
HOST_MEM_TOTAL: Field
HOST_DISK_READ: Field
HOST_DISK_WRITE: Field
HOST_NET_RX: Field
HOST_NET_TX: Field
HOST_LOAD1: Field
THROTTLE_NONE: ThrottleReason
THROTTLE_GPU_IDLE: ThrottleReason
THROTTLE_APPLICATIONS_CLOCKS: ThrottleReason
THROTTLE_SW_POWER_CAP: ThrottleReason
THROTTLE_HW_SLOWDOWN: ThrottleReason
THROTTLE_SYNC_BOOST: ThrottleReason
THROTTLE_SW_THERMAL: ThrottleReason
THROTTLE_HW_THERMAL: ThrottleReason
THROTTLE_HW_POWER_BRAKE: ThrottleReason
THROTTLE_DISPLAY_CLOCKS: ThrottleReason
DEVICE_KIND_UNSPECIFIED: DeviceKind
DEVICE_KIND_GPU: DeviceKind
DEVICE_KIND_HOST: DeviceKind
VALUE_TYPE_UNSPECIFIED: ValueType
VALUE_TYPE_F32: ValueType
VALUE_TYPE_F64: ValueType
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_XID: EventKind
EVENT_ECC_UNCORRECTED: EventKind
EVENT_THROTTLE: EventKind
EVENT_GPU_LOST: EventKind
EVENT_GPU_RECOVERED: EventKind
EVENT_PROCESS_MEMORY: EventKind

class Series(_message.Message):
    __slots__ = ("field", "type", "values")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    field: Field
    type: ValueType
    values: bytes
    def __init__(self, field: _Optional[_Union[Field, str]] = ..., type: _Optional[_Union[ValueType, str]] = ..., values: _Optional[bytes] = ...) -> None: ...

class DeviceEvent(_message.Message):
    __slots__ = ("time_ns", "kind", "code", "value", "detail")
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    time_ns: int
    kind: EventKind
    code: int
    value: float
    detail: str
    def __init__(self, time_ns: _Optional[int] = ..., kind: _Optional[_Union[EventKind, str]] = ..., code: _Optional[int] = ..., value: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("index", "uuid", "batch_seq", "first_sample_seq", "events")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    FIRST_SAMPLE_SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    batch_seq: int
    first_sample_seq: int
    events: _containers.RepeatedCompositeFieldContainer[DeviceEvent]
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., batch_seq: _Optional[int] = ..., first_sample_seq: _Optional[int] = ..., events: _Optional[_Iterable[_Union[DeviceEvent, _Mapping]]] = ...) -> None: ...

class MetricBatch(_message.Message):
    __slots__ = ("node_id", "device_kind", "agent_epoch_ns", "base_time_ns", "time_offsets_us", "devices", "series", "sample_hz", "job_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    AGENT_EPOCH_NS_FIELD_NUMBER: _ClassVar[int]
    BASE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    TIME_OFFSETS_US_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_HZ_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    device_kind: DeviceKind
    agent_epoch_ns: int
    base_time_ns: int
    time_offsets_us: bytes
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    series: _containers.RepeatedCompositeFieldContainer[Series]
    sample_hz: float
    job_id: str
    def __init__(self, node_id: _Optional[str] = ..., device_kind: _Optional[_Union[DeviceKind, str]] = ..., agent_epoch_ns: _Optional[int] = ..., base_time_ns: _Optional[int] = ..., time_offsets_us: _Optional[bytes] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., series: _Optional[_Iterable[_Union[Series, _Mapping]]] = ..., sample_hz: _Optional[float] = ..., job_id: _Optional[str] = ...) -> None: ...

class NvLink(_message.Message):
    __slots__ = ("link", "peer_pci_bus_id", "peer_gpu_index", "active")
    LINK_FIELD_NUMBER: _ClassVar[int]
    PEER_PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    link: int
    peer_pci_bus_id: str
    peer_gpu_index: int
    active: bool
    def __init__(self, link: _Optional[int] = ..., peer_pci_bus_id: _Optional[str] = ..., peer_gpu_index: _Optional[int] = ..., active: _Optional[bool] = ...) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("index", "uuid", "name", "memory_total_mib", "pci_bus_id", "power_limit_w", "sm_clock_max_mhz", "nvlinks", "unsupported_fields")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    NVLINKS_FIELD_NUMBER: _ClassVar[int]
    UNSUPPORTED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    pci_bus_id: str
    power_limit_w: float
    sm_clock_max_mhz: int
    nvlinks: _containers.RepeatedCompositeFieldContainer[NvLink]
    unsupported_fields: _containers.RepeatedScalarFieldContainer[Field]
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., memory_total_mib: _Optional[int] = ..., pci_bus_id: _Optional[str] = ..., power_limit_w: _Optional[float] = ..., sm_clock_max_mhz: _Optional[int] = ..., nvlinks: _Optional[_Iterable[_Union[NvLink, _Mapping]]] = ..., unsupported_fields: _Optional[_Iterable[_Union[Field, str]]] = ...) -> None: ...

class NodeInventory(_message.Message):
    __slots__ = ("node_id", "hostname", "time_ns", "source", "driver_version", "cuda_driver_version", "cpu_count", "memory_total_mib", "gpus")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    time_ns: int
    source: str
    driver_version: str
    cuda_driver_version: str
    cpu_count: int
    memory_total_mib: int
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., time_ns: _Optional[int] = ..., source: _Optional[str] = ..., driver_version: _Optional[str] = ..., cuda_driver_version: _Optional[str] = ..., cpu_count: _Optional[int] = ..., memory_total_mib: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ...) -> None: ...
