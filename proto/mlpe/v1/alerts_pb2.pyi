from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_INFO: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_CRITICAL: _ClassVar[Severity]

class AlertState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_STATE_UNSPECIFIED: _ClassVar[AlertState]
    ALERT_FIRING: _ClassVar[AlertState]
    ALERT_RESOLVED: _ClassVar[AlertState]
SEVERITY_UNSPECIFIED: Severity
SEVERITY_INFO: Severity
SEVERITY_WARNING: Severity
SEVERITY_CRITICAL: Severity
ALERT_STATE_UNSPECIFIED: AlertState
ALERT_FIRING: AlertState
ALERT_RESOLVED: AlertState

class Alert(_message.Message):
    __slots__ = ("fingerprint", "rule", "detector", "severity", "state", "labels", "value", "threshold", "starts_at_ns", "ends_at_ns", "detected_at_ns", "summary", "explanation")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STARTS_AT_NS_FIELD_NUMBER: _ClassVar[int]
    ENDS_AT_NS_FIELD_NUMBER: _ClassVar[int]
    DETECTED_AT_NS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    rule: str
    detector: str
    severity: Severity
    state: AlertState
    labels: _containers.ScalarMap[str, str]
    value: float
    threshold: float
    starts_at_ns: int
    ends_at_ns: int
    detected_at_ns: int
    summary: str
    explanation: str
    def __init__(self, fingerprint: _Optional[str] = ..., rule: _Optional[str] = ..., detector: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., state: _Optional[_Union[AlertState, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., starts_at_ns: _Optional[int] = ..., ends_at_ns: _Optional[int] = ..., detected_at_ns: _Optional[int] = ..., summary: _Optional[str] = ..., explanation: _Optional[str] = ...) -> None: ...
