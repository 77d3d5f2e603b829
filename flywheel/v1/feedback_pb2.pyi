from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRankingRequest(_message.Message):
    __slots__ = ("group_id", "completion_ids", "annotator_id", "comment", "idempotency_key")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_IDS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    completion_ids: _containers.RepeatedScalarFieldContainer[str]
    annotator_id: str
    comment: str
    idempotency_key: str
    def __init__(self, group_id: _Optional[str] = ..., completion_ids: _Optional[_Iterable[str]] = ..., annotator_id: _Optional[str] = ..., comment: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SubmitRankingResponse(_message.Message):
    __slots__ = ("ranking_id", "stream_entry_id", "duplicate")
    RANKING_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ranking_id: str
    stream_entry_id: str
    duplicate: bool
    def __init__(self, ranking_id: _Optional[str] = ..., stream_entry_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class GetFeedbackStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConsumerGroupStats(_message.Message):
    __slots__ = ("name", "pending", "lag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    pending: int
    lag: int
    def __init__(self, name: _Optional[str] = ..., pending: _Optional[int] = ..., lag: _Optional[int] = ...) -> None: ...

class FeedbackStats(_message.Message):
    __slots__ = ("rankings_total", "human_rankings", "ai_rankings", "stream_length", "consumer_groups", "ai_human_agreement", "agreement_pairs")
    RANKINGS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HUMAN_RANKINGS_FIELD_NUMBER: _ClassVar[int]
    AI_RANKINGS_FIELD_NUMBER: _ClassVar[int]
    STREAM_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    AI_HUMAN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_PAIRS_FIELD_NUMBER: _ClassVar[int]
    rankings_total: int
    human_rankings: int
    ai_rankings: int
    stream_length: int
    consumer_groups: _containers.RepeatedCompositeFieldContainer[ConsumerGroupStats]
    ai_human_agreement: float
    agreement_pairs: int
    def __init__(self, rankings_total: _Optional[int] = ..., human_rankings: _Optional[int] = ..., ai_rankings: _Optional[int] = ..., stream_length: _Optional[int] = ..., consumer_groups: _Optional[_Iterable[_Union[ConsumerGroupStats, _Mapping]]] = ..., ai_human_agreement: _Optional[float] = ..., agreement_pairs: _Optional[int] = ...) -> None: ...
