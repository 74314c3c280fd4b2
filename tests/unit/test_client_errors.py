"""The client's typed exceptions: one class per status, and builtin bases for code that cannot import them."""

import grpc
import numpy as np
import pytest

from nanodist.client import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NanodistError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from nanodist.client.errors import from_rpc_error
from nanodist.client.ps_shard import StreamedPull
from nanodist.wire import codec


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [(DeadlineExceeded, TimeoutError), (NotFound, LookupError), (Unavailable, ConnectionError)],
)
def test_three_errors_are_also_builtin_exceptions(cls, builtin):
    error = from_rpc_error(FakeRpcError(cls.code, "why"), "127.0.0.1:1")
    assert type(error) is cls and isinstance(error, builtin) and isinstance(error, NanodistError)
    with pytest.raises(builtin):
        raise error
    # The builtin base changes nothing a caller of the typed error sees.
    assert error.args == ("why [127.0.0.1:1]",) and error.message == "why [127.0.0.1:1]"
    assert str(error) == f"{cls.code.name}: why [127.0.0.1:1]" and error.code == cls.code
    assert cls("late").code == cls.code


def test_every_mapped_status_gets_its_class_and_others_a_plain_nanodist_error():
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        Aborted,
        DeadlineExceeded,
        ResourceExhausted,
        Unavailable,
    ):
        assert type(from_rpc_error(FakeRpcError(cls.code, "x"))) is cls
    other = from_rpc_error(FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, ""))
    assert type(other) is NanodistError and other.code == grpc.StatusCode.UNAUTHENTICATED
    assert other.message == "UNAUTHENTICATED"


def test_the_others_are_not_builtin_timeouts_or_connection_errors():
    for cls in (InvalidArgument, FailedPrecondition, Aborted, ResourceExhausted):
        assert not isinstance(cls("x"), (TimeoutError, ConnectionError, LookupError))


def test_a_key_updated_during_a_streamed_pull_raises_aborted():
    def piece(version: int, offset: int) -> bytes:
        entry = codec.Entry("w", dense=np.zeros(4, np.float32), version=version, offset=offset, shape=[8])
        return codec.encode_pull_response([entry])

    with pytest.raises(Aborted, match="'w' changed during a streamed pull"):
        StreamedPull(iter([piece(1, 0), piece(2, 4)])).result()
    (entry,), _ = StreamedPull(iter([piece(3, 0), piece(3, 4)])).result()
    assert entry.version == 3 and entry.dense is not None and entry.dense.shape == (8,)
