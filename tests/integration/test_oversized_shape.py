"""A live parameter server refuses a shape whose size overflows int64 as too large, and keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.v1 import parameter_server_pb2_grpc, tensor_pb2
from nanodist.wire import codec

HUGE = [2**40, 2**40]


def huge_tensor() -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=HUGE)


def refusal(call: grpc.UnaryUnaryMultiCallable, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=10)
    return raised.value


def test_an_overflowing_shape_is_invalid_and_too_large_and_the_server_keeps_serving(start_server) -> None:
    server = start_server("ps")
    with grpc.insecure_channel(server.address) as channel:
        stub = parameter_server_pb2_grpc.ParameterServerStub(channel)
        sgd = ps.Optimizer(kind=ps.Optimizer.SGD, learning_rate=0.1)
        stub.Init(
            ps.InitRequest(
                entries=[ps.InitEntry(key="w", value=codec.to_proto(np.zeros(3, np.float32)), optimizer=sgd)]
            )
        )

        init = refusal(stub.Init, ps.InitRequest(entries=[ps.InitEntry(key="big", value=huge_tensor())]))
        push = refusal(stub.Push, ps.PushRequest(entries=[ps.GradientEntry(key="w", dense=huge_tensor())]))
        for error, path in ((init, "entries[0].value.shape"), (push, "entries[0].dense.shape")):
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details().startswith(f"{path}: {HUGE} is too large"), error.details()
            assert str(codec.MAX_TENSOR_BYTES) in error.details()

        # Still serving, and the refused requests changed nothing.
        stub.Push(ps.PushRequest(entries=[ps.GradientEntry(key="w", dense=codec.to_proto(np.ones(3, np.float32)))]))
        keys = stub.ListKeys(ps.ListKeysRequest()).keys
        assert [(k.key, k.version) for k in keys] == [("w", 1)]
