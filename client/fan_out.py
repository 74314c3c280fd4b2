"""One call per shard at once, then every answer collected: UNAVAILABLE retried, the first failure raised."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import grpc

from nanodist.client.errors import from_rpc_error
from nanodist.client.lane import LaneCall
from nanodist.client.ps_shard import Pending, Shard
from nanodist.client.retry import RetryPolicy

Request = TypeVar("Request")
Result = TypeVar("Result")


def fan_out(
    shards: Sequence[Shard],
    retry: RetryPolicy,
    calls: Mapping[int, Request],
    start: Callable[[int, Request], Pending[Result]],
) -> dict[int, Result]:
    """Start one call per shard at once, then collect; UNAVAILABLE shards are retried."""
    pending = {i: start(i, request) for i, request in calls.items()}
    results: dict[int, Result] = {}
    failure: Exception | None = None
    for i, call in pending.items():
        if failure is not None:
            if isinstance(call, LaneCall):
                call.abandon()  # its answer will never be read: the lane's connection goes with it
            continue
        try:
            results[i] = call.result()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                failure = from_rpc_error(error, shards[i].address)
                continue
            try:
                results[i] = retry.call(lambda i=i: start(i, calls[i]).result())  # type: ignore[misc]
            except grpc.RpcError as retry_failed:
                failure = from_rpc_error(retry_failed, shards[i].address)
            except Exception as retry_failed:
                failure = retry_failed
    if failure is not None:
        raise failure
    return results
