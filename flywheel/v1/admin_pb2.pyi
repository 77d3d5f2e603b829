from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_STATUS_UNSPECIFIED: _ClassVar[PolicyStatus]
    POLICY_STATUS_CURRENT: _ClassVar[PolicyStatus]
    POLICY_STATUS_CANDIDATE: _ClassVar[PolicyStatus]
    POLICY_STATUS_REJECTED: _ClassVar[PolicyStatus]
    POLICY_STATUS_ROLLED_BACK: _ClassVar[PolicyStatus]
    POLICY_STATUS_SUPERSEDED: _ClassVar[PolicyStatus]
POLICY_STATUS_UNSPECIFIED: PolicyStatus
POLICY_STATUS_CURRENT: PolicyStatus
POLICY_STATUS_CANDIDATE: PolicyStatus
POLICY_STATUS_REJECTED: PolicyStatus
POLICY_STATUS_ROLLED_BACK: PolicyStatus
POLICY_STATUS_SUPERSEDED: PolicyStatus

class PolicyVersion(_message.Message):
    __slots__ = ("version", "parent_version", "reward_model_version", "status", "created_unix", "gate_metrics", "artifact_path", "format")
    class GateMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    GATE_METRICS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    version: int
    parent_version: int
    reward_model_version: int
    status: PolicyStatus
    created_unix: float
    gate_metrics: _containers.ScalarMap[str, float]
    artifact_path: str
    format: str
    def __init__(self, version: _Optional[int] = ..., parent_version: _Optional[int] = ..., reward_model_version: _Optional[int] = ..., status: _Optional[_Union[PolicyStatus, str]] = ..., created_unix: _Optional[float] = ..., gate_metrics: _Optional[_Mapping[str, float]] = ..., artifact_path: _Optional[str] = ..., format: _Optional[str] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies", "current_version")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyVersion]
    current_version: int
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyVersion, _Mapping]]] = ..., current_version: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlatformStatus(_message.Message):
    __slots__ = ("serving_policy_version", "registry_policy_version", "reward_model_version", "rankings_waiting", "running_sequences", "queued_requests", "promotion_frozen", "promotion_frozen_reason", "registry_pointer_missing")
    SERVING_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANKINGS_WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_FROZEN_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_FROZEN_REASON_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_POINTER_MISSING_FIELD_NUMBER: _ClassVar[int]
    serving_policy_version: int
    registry_policy_version: int
    reward_model_version: int
    rankings_waiting: int
    running_sequences: int
    queued_requests: int
    promotion_frozen: bool
    promotion_frozen_reason: str
    registry_pointer_missing: bool
    def __init__(self, serving_policy_version: _Optional[int] = ..., registry_policy_version: _Optional[int] = ..., reward_model_version: _Optional[int] = ..., rankings_waiting: _Optional[int] = ..., running_sequences: _Optional[int] = ..., queued_requests: _Optional[int] = ..., promotion_frozen: _Optional[bool] = ..., promotion_frozen_reason: _Optional[str] = ..., registry_pointer_missing: _Optional[bool] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("to_version", "reason")
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    to_version: int
    reason: str
    def __init__(self, to_version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class PolicyChange(_message.Message):
    __slots__ = ("from_version", "to_version")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    to_version: int
    def __init__(self, from_version: _Optional[int] = ..., to_version: _Optional[int] = ...) -> None: ...

class ResumePromotionRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ResumePromotionResponse(_message.Message):
    __slots__ = ("was_frozen",)
    WAS_FROZEN_FIELD_NUMBER: _ClassVar[int]
    was_frozen: bool
    def __init__(self, was_frozen: _Optional[bool] = ...) -> None: ...
