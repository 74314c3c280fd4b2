from nanodist.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Optimizer(_message.Message):
    __slots__ = ("kind", "learning_rate", "momentum", "beta1", "beta2", "epsilon")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Optimizer.Kind]
        SGD: _ClassVar[Optimizer.Kind]
        MOMENTUM: _ClassVar[Optimizer.Kind]
        ADAM: _ClassVar[Optimizer.Kind]
        ADAGRAD: _ClassVar[Optimizer.Kind]
        AVERAGE: _ClassVar[Optimizer.Kind]
    KIND_UNSPECIFIED: Optimizer.Kind
    SGD: Optimizer.Kind
    MOMENTUM: Optimizer.Kind
    ADAM: Optimizer.Kind
    ADAGRAD: Optimizer.Kind
    AVERAGE: Optimizer.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    kind: Optimizer.Kind
    learning_rate: float
    momentum: float
    beta1: float
    beta2: float
    epsilon: float
    def __init__(self, kind: _Optional[_Union[Optimizer.Kind, str]] = ..., learning_rate: _Optional[float] = ..., momentum: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., epsilon: _Optional[float] = ...) -> None: ...

class RowInitializer(_message.Message):
    __slots__ = ("kind", "scale", "seed")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[RowInitializer.Kind]
        NORMAL: _ClassVar[RowInitializer.Kind]
        UNIFORM: _ClassVar[RowInitializer.Kind]
        ZEROS: _ClassVar[RowInitializer.Kind]
    KIND_UNSPECIFIED: RowInitializer.Kind
    NORMAL: RowInitializer.Kind
    UNIFORM: RowInitializer.Kind
    ZEROS: RowInitializer.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: RowInitializer.Kind
    scale: float
    seed: int
    def __init__(self, kind: _Optional[_Union[RowInitializer.Kind, str]] = ..., scale: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class TableSpec(_message.Message):
    __slots__ = ("rows", "columns", "dtype", "initializer", "first_row")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROW_FIELD_NUMBER: _ClassVar[int]
    rows: int
    columns: int
    dtype: _tensor_pb2.DType
    initializer: RowInitializer
    first_row: int
    def __init__(self, rows: _Optional[int] = ..., columns: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., initializer: _Optional[_Union[RowInitializer, _Mapping]] = ..., first_row: _Optional[int] = ...) -> None: ...

class InitEntry(_message.Message):
    __slots__ = ("key", "value", "optimizer", "table")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: _tensor_pb2.Tensor
    optimizer: Optimizer
    table: TableSpec
    def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., table: _Optional[_Union[TableSpec, _Mapping]] = ...) -> None: ...

class InitRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[InitEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[InitEntry, _Mapping]]] = ...) -> None: ...

class InitResult(_message.Message):
    __slots__ = ("key", "created", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    created: bool
    version: int
    def __init__(self, key: _Optional[str] = ..., created: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class InitResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[InitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[InitResult, _Mapping]]] = ...) -> None: ...

class GradientEntry(_message.Message):
    __slots__ = ("key", "dense", "sparse", "offset")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    key: str
    dense: _tensor_pb2.Tensor
    sparse: _tensor_pb2.SparseRows
    offset: int
    def __init__(self, key: _Optional[str] = ..., dense: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sparse: _Optional[_Union[_tensor_pb2.SparseRows, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("entries", "worker_id", "step", "request_id", "fencing_token", "generation", "pushers")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PUSHERS_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[GradientEntry]
    worker_id: int
    step: int
    request_id: str
    fencing_token: int
    generation: int
    pushers: int
    def __init__(self, entries: _Optional[_Iterable[_Union[GradientEntry, _Mapping]]] = ..., worker_id: _Optional[int] = ..., step: _Optional[int] = ..., request_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., generation: _Optional[int] = ..., pushers: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("versions", "duplicate", "applied")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedScalarFieldContainer[int]
    duplicate: bool
    applied: bool
    def __init__(self, versions: _Optional[_Iterable[int]] = ..., duplicate: _Optional[bool] = ..., applied: _Optional[bool] = ...) -> None: ...

class PullEntry(_message.Message):
    __slots__ = ("key", "rows")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    key: str
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key: _Optional[str] = ..., rows: _Optional[_Iterable[int]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("entries", "min_version", "clock", "timeout_ms", "chunk_bytes", "worker_id")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[PullEntry]
    min_version: int
    clock: int
    timeout_ms: int
    chunk_bytes: int
    worker_id: int
    def __init__(self, entries: _Optional[_Iterable[_Union[PullEntry, _Mapping]]] = ..., min_version: _Optional[int] = ..., clock: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., worker_id: _Optional[int] = ...) -> None: ...

class ValueEntry(_message.Message):
    __slots__ = ("key", "dense", "sparse", "version", "offset", "shape")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    key: str
    dense: _tensor_pb2.Tensor
    sparse: _tensor_pb2.SparseRows
    version: int
    offset: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key: _Optional[str] = ..., dense: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sparse: _Optional[_Union[_tensor_pb2.SparseRows, _Mapping]] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("entries", "slowest_clock")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SLOWEST_CLOCK_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ValueEntry]
    slowest_clock: int
    def __init__(self, entries: _Optional[_Iterable[_Union[ValueEntry, _Mapping]]] = ..., slowest_clock: _Optional[int] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("key", "dtype", "shape", "version", "optimizer", "table", "rows_held")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_HELD_FIELD_NUMBER: _ClassVar[int]
    key: str
    dtype: _tensor_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    version: int
    optimizer: Optimizer
    table: TableSpec
    rows_held: int
    def __init__(self, key: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., version: _Optional[int] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., table: _Optional[_Union[TableSpec, _Mapping]] = ..., rows_held: _Optional[int] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("mode", "num_workers", "staleness", "num_keys", "total_bytes", "pushes_applied", "pushes_deduplicated", "worker_clocks", "durability", "wal_records", "wal_fsyncs", "replicas")
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PUSHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    WORKER_CLOCKS_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    WAL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    WAL_FSYNCS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    num_workers: int
    staleness: int
    num_keys: int
    total_bytes: int
    pushes_applied: int
    pushes_deduplicated: int
    worker_clocks: _containers.RepeatedScalarFieldContainer[int]
    durability: str
    wal_records: int
    wal_fsyncs: int
    replicas: ReplicaSetStatus
    def __init__(self, mode: _Optional[str] = ..., num_workers: _Optional[int] = ..., staleness: _Optional[int] = ..., num_keys: _Optional[int] = ..., total_bytes: _Optional[int] = ..., pushes_applied: _Optional[int] = ..., pushes_deduplicated: _Optional[int] = ..., worker_clocks: _Optional[_Iterable[int]] = ..., durability: _Optional[str] = ..., wal_records: _Optional[int] = ..., wal_fsyncs: _Optional[int] = ..., replicas: _Optional[_Union[ReplicaSetStatus, _Mapping]] = ...) -> None: ...

class ReplicaSetStatus(_message.Message):
    __slots__ = ("name", "role", "primary", "epoch", "seq", "followers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FOLLOWERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    primary: str
    epoch: int
    seq: int
    followers: _containers.RepeatedCompositeFieldContainer[FollowerStatus]
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., primary: _Optional[str] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ..., followers: _Optional[_Iterable[_Union[FollowerStatus, _Mapping]]] = ...) -> None: ...

class FollowerStatus(_message.Message):
    __slots__ = ("address", "in_sync", "behind")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    BEHIND_FIELD_NUMBER: _ClassVar[int]
    address: str
    in_sync: bool
    behind: int
    def __init__(self, address: _Optional[str] = ..., in_sync: _Optional[bool] = ..., behind: _Optional[int] = ...) -> None: ...

class FollowRequest(_message.Message):
    __slots__ = ("address", "incarnation", "acked_seq")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    address: str
    incarnation: str
    acked_seq: int
    def __init__(self, address: _Optional[str] = ..., incarnation: _Optional[str] = ..., acked_seq: _Optional[int] = ...) -> None: ...

class FollowRecord(_message.Message):
    __slots__ = ("epoch", "seq", "snapshot_file", "snapshot_done", "init", "push")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FILE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_DONE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    seq: int
    snapshot_file: SnapshotFile
    snapshot_done: bool
    init: bytes
    push: bytes
    def __init__(self, epoch: _Optional[int] = ..., seq: _Optional[int] = ..., snapshot_file: _Optional[_Union[SnapshotFile, _Mapping]] = ..., snapshot_done: _Optional[bool] = ..., init: _Optional[bytes] = ..., push: _Optional[bytes] = ...) -> None: ...

class SnapshotFile(_message.Message):
    __slots__ = ("name", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class OpenLaneRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenLaneResponse(_message.Message):
    __slots__ = ("tcp_port", "local_socket", "secret", "max_message_bytes")
    TCP_PORT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    tcp_port: int
    local_socket: str
    secret: bytes
    max_message_bytes: int
    def __init__(self, tcp_port: _Optional[int] = ..., local_socket: _Optional[str] = ..., secret: _Optional[bytes] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
