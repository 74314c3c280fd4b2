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
from nanodist.client.optimizers import adagrad, adam, average, momentum, sgd
from nanodist.client.ps_client import ParameterServerClient
from nanodist.client.ps_values import SparseGradient, Values
from nanodist.client.retry import RetryPolicy
from nanodist.client.rpc import ClientSecurity
from nanodist.client.sharding import shard_of
from nanodist.wire.codec import Membership

__all__ = [
    "BarrierBroken",
    "BarrierClient",
    "ClientSecurity",
    "Held",
    "KVStore",
    "LockClient",
    "Membership",
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
    "average",
    "momentum",
    "sgd",
    "shard_of",
]
