"""The nanodist Python client library."""

from nanodist.client.barrier_client import BarrierBroken, BarrierClient, Released
from nanodist.client.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NanodistError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from nanodist.client.kv_client import KVStore
from nanodist.client.lock_client import Held, LockClient
from nanodist.client.ps_client import (
    ParameterServerClient,
    SparseGradient,
    Values,
    adagrad,
    adam,
    momentum,
    sgd,
)
from nanodist.client.retry import RetryPolicy
from nanodist.client.sharding import shard_of

__all__ = [
    "BarrierBroken",
    "BarrierClient",
    "Held",
    "KVStore",
    "LockClient",
    "Released",
    "Aborted",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NanodistError",
    "NotFound",
    "ParameterServerClient",
    "ResourceExhausted",
    "RetryPolicy",
    "SparseGradient",
    "Unavailable",
    "Values",
    "adagrad",
    "adam",
    "momentum",
    "sgd",
    "shard_of",
]
