from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpenSessionRequest(_message.Message):
    __slots__ = ("member_id", "ttl_ms", "barriers", "idempotency_key")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    BARRIERS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    ttl_ms: int
    barriers: _containers.RepeatedScalarFieldContainer[str]
    idempotency_key: str
    def __init__(self, member_id: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., barriers: _Optional[_Iterable[str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "ttl_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ttl_ms: int
    def __init__(self, session_id: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class KeepAliveSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class KeepAliveSessionResponse(_message.Message):
    __slots__ = ("ttl_ms",)
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ttl_ms: int
    def __init__(self, ttl_ms: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("name", "parties", "member_id", "timeout_ms", "session_id", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARTIES_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    parties: int
    member_id: str
    timeout_ms: int
    session_id: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., parties: _Optional[int] = ..., member_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class WaitResponse(_message.Message):
    __slots__ = ("generation", "arrival_index")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_INDEX_FIELD_NUMBER: _ClassVar[int]
    generation: int
    arrival_index: int
    def __init__(self, generation: _Optional[int] = ..., arrival_index: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("name", "member_id", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    member_id: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., member_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ResetResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class BarrierStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class BarrierState(_message.Message):
    __slots__ = ("name", "parties", "generation", "arrived", "missing", "broken_reason", "lapsed_member")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARTIES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    BROKEN_REASON_FIELD_NUMBER: _ClassVar[int]
    LAPSED_MEMBER_FIELD_NUMBER: _ClassVar[int]
    name: str
    parties: int
    generation: int
    arrived: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    broken_reason: str
    lapsed_member: str
    def __init__(self, name: _Optional[str] = ..., parties: _Optional[int] = ..., generation: _Optional[int] = ..., arrived: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ..., broken_reason: _Optional[str] = ..., lapsed_member: _Optional[str] = ...) -> None: ...

class BarrierStatusResponse(_message.Message):
    __slots__ = ("barriers",)
    BARRIERS_FIELD_NUMBER: _ClassVar[int]
    barriers: _containers.RepeatedCompositeFieldContainer[BarrierState]
    def __init__(self, barriers: _Optional[_Iterable[_Union[BarrierState, _Mapping]]] = ...) -> None: ...
