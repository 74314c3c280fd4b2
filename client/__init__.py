"""The nanodist Python client library."""

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
