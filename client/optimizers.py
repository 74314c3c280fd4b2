"""Optimizer settings for ParameterServerClient.init: the shards run the optimizer, per key."""

from __future__ import annotations

from nanodist.v1 import parameter_server_pb2 as ps


def sgd(learning_rate: float) -> ps.Optimizer:
    return ps.Optimizer(kind=ps.Optimizer.SGD, learning_rate=learning_rate)


def momentum(learning_rate: float, momentum: float = 0.9) -> ps.Optimizer:
    return ps.Optimizer(kind=ps.Optimizer.MOMENTUM, learning_rate=learning_rate, momentum=momentum)


def adam(learning_rate: float, beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8) -> ps.Optimizer:
    return ps.Optimizer(
        kind=ps.Optimizer.ADAM,
        learning_rate=learning_rate,
        beta1=beta1,
        beta2=beta2,
        epsilon=epsilon,
    )


def adagrad(learning_rate: float, epsilon: float = 1e-10) -> ps.Optimizer:
    return ps.Optimizer(kind=ps.Optimizer.ADAGRAD, learning_rate=learning_rate, epsilon=epsilon)


def average() -> ps.Optimizer:
    """No update rule: under BSP the key holds the step's mean gradient (gradient averaging across workers)."""
    return ps.Optimizer(kind=ps.Optimizer.AVERAGE)
