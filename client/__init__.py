"""The nanodist Python client library.

Its names load on first use (PEP 562), so that a light tool such as `nanodist health`, a
container's periodic health check, pays only for the modules it needs, not numpy and the codec.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOMES = {
    "BarrierBroken": "nanodist.client.barrier_client",
    "BarrierClient": "nanodist.client.barrier_client",
    "Released": "nanodist.client.barrier_client",
    "Aborted": "nanodist.client.errors",
    "DeadlineExceeded": "nanodist.client.errors",
    "FailedPrecondition": "nanodist.client.errors",
    "InvalidArgument": "nanodist.client.errors",
    "NanodistError": "nanodist.client.errors",
    "NotFound": "nanodist.client.errors",
    "ResourceExhausted": "nanodist.client.errors",
    "Unavailable": "nanodist.client.errors",
    "KVStore": "nanodist.client.kv_client",
    "Held": "nanodist.client.lock_client",
    "LockClient": "nanodist.client.lock_client",
    "adagrad": "nanodist.client.optimizers",
    "adam": "nanodist.client.optimizers",
    "average": "nanodist.client.optimizers",
    "momentum": "nanodist.client.optimizers",
    "sgd": "nanodist.client.optimizers",
    "ParameterServerClient": "nanodist.client.ps_client",
    "SparseGradient": "nanodist.client.ps_values",
    "Values": "nanodist.client.ps_values",
    "RetryPolicy": "nanodist.client.retry",
    "ClientSecurity": "nanodist.client.rpc",
    "shard_of": "nanodist.client.sharding",
    "Membership": "nanodist.wire.codec",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain one
    return value
