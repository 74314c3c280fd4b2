"""ReplicaChannel's choice of replica, on stand-in channels (the calls over real replicas, killed and frozen,
are in tests/integration/test_etcd_store.py)."""

import grpc
import pytest

from nanodist.client.replicas import ReplicaChannel


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class StandIn:
    """A channel whose one method answers with its address, or fails with the code it is told to."""

    def __init__(self, address: str, failing: dict[str, grpc.StatusCode]) -> None:
        self.address, self.failing = address, failing

    def unary_unary(self, method, **kwargs):
        def call(request, timeout=None):
            if self.address in self.failing:
                raise Failure(self.failing[self.address])
            return self.address

        return call

    def close(self) -> None:
        pass


def replicas(failing: dict[str, grpc.StatusCode]):
    channel = ReplicaChannel(["a:1", "b:1", "c:1"], lambda address: StandIn(address, failing))
    return channel, channel.unary_unary("/x.Y/Z")


def test_calls_stay_on_the_first_replica_while_it_answers():
    _, call = replicas({})
    assert [call(b"") for _ in range(3)] == ["a:1"] * 3


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_a_replica_gone_or_frozen_moves_the_next_call_to_the_next_one(code):
    failing = {"a:1": code}
    _, call = replicas(failing)
    with pytest.raises(Failure):
        call(b"")
    assert call(b"") == "b:1"
    failing["b:1"] = code
    with pytest.raises(Failure):
        call(b"")
    del failing["a:1"]
    assert [call(b""), call(b"")] == ["c:1", "c:1"]


def test_an_answer_that_refuses_the_request_does_not_move_the_calls():
    failing = {"a:1": grpc.StatusCode.INVALID_ARGUMENT}
    _, call = replicas(failing)
    with pytest.raises(Failure):
        call(b"")
    del failing["a:1"]
    assert call(b"") == "a:1"
