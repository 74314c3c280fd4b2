"""Server-side optimizers, applied in place.

Updates run over fixed-size chunks with one small scratch buffer, so a push
never allocates a temporary the size of the tensor and stays in cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nanodist.services.common.errors import invalid
from nanodist.v1 import parameter_server_pb2 as ps

CHUNK_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class OptimizerConfig:
    kind: ps.Optimizer.Kind = ps.Optimizer.SGD
    learning_rate: float = 0.01
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8

    @classmethod
    def from_proto(cls, message: ps.Optimizer, path: str) -> OptimizerConfig:
        if message.kind not in ps.Optimizer.Kind.values():
            raise invalid(f"{path}.kind: unknown optimizer {message.kind}")
        lr = message.learning_rate
        if message.kind != ps.Optimizer.AVERAGE and not (math.isfinite(lr) and lr > 0):
            raise invalid(f"{path}.learning_rate: must be finite and > 0, got {lr}")
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(message, name)
            if not 0 <= value < 1:
                raise invalid(f"{path}.{name}: must be in [0, 1), got {value}")
        if not (math.isfinite(message.epsilon) and message.epsilon >= 0):
            raise invalid(f"{path}.epsilon: must be finite and >= 0, got {message.epsilon}")
        kind = message.kind or ps.Optimizer.SGD  # KIND_UNSPECIFIED means SGD
        default_eps = 1e-10 if kind == ps.Optimizer.ADAGRAD else 1e-8
        return cls(
            kind=kind,
            learning_rate=lr,
            momentum=message.momentum or 0.9,
            beta1=message.beta1 or 0.9,
            beta2=message.beta2 or 0.999,
            epsilon=message.epsilon or default_eps,
        )

    def to_proto(self) -> ps.Optimizer:
        return ps.Optimizer(
            kind=self.kind,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
            beta1=self.beta1,
            beta2=self.beta2,
            epsilon=self.epsilon,
        )

    @property
    def state_count(self) -> int:
        """How many arrays of the parameter's shape the rule keeps."""
        return {
            ps.Optimizer.SGD: 0,
            ps.Optimizer.MOMENTUM: 1,
            ps.Optimizer.ADAM: 2,
            ps.Optimizer.ADAGRAD: 1,
            ps.Optimizer.AVERAGE: 0,
        }[self.kind]


class Optimizer:
    """One key's update rule and state. `apply` works on flat, same-dtype arrays."""

    def __init__(self, config: OptimizerConfig, param: np.ndarray) -> None:
        self.config = config
        self.states = [np.zeros_like(param) for _ in range(config.state_count)]
        self.steps = 0  # Adam's bias-correction counter
        self._scratch = np.empty(min(param.size, CHUNK_ELEMENTS), dtype=param.dtype)
        # Adam needs a second buffer; the other rules get an empty one, so the type stays one array.
        self._scratch2 = np.empty_like(self._scratch) if config.kind == ps.Optimizer.ADAM else self._scratch[:0]

    def apply(self, param: np.ndarray, grad: np.ndarray, states: list[np.ndarray], scale: float = 1.0) -> None:
        """param -= update(grad * scale); `states` are this rule's state arrays, same layout."""
        self.steps += 1
        c = self.config
        if self._scratch.size < min(param.size, CHUNK_ELEMENTS):  # a table's rows grew
            self._scratch = np.empty(min(param.size, CHUNK_ELEMENTS), dtype=param.dtype)
            self._scratch2 = np.empty_like(self._scratch) if c.kind == ps.Optimizer.ADAM else self._scratch[:0]
        for start in range(0, param.size, CHUNK_ELEMENTS):
            end = min(start + CHUNK_ELEMENTS, param.size)
            p, g = param[start:end], grad[start:end]
            s = [state[start:end] for state in states]
            t = self._scratch[: end - start]
            if c.kind == ps.Optimizer.AVERAGE:
                if scale == 1.0:
                    np.copyto(p, g)  # a copy, not float16 arithmetic (which numpy does without SIMD)
                else:
                    np.multiply(g, scale, out=p)
            elif c.kind == ps.Optimizer.SGD:
                np.multiply(g, c.learning_rate * scale, out=t)
                np.subtract(p, t, out=p)
            elif c.kind == ps.Optimizer.MOMENTUM:
                (v,) = s
                np.multiply(v, c.momentum, out=v)
                np.multiply(g, scale, out=t)
                np.add(v, t, out=v)
                np.multiply(v, c.learning_rate, out=t)
                np.subtract(p, t, out=p)
            elif c.kind == ps.Optimizer.ADAGRAD:
                (acc,) = s
                np.multiply(g, scale, out=t)
                np.multiply(t, t, out=t)
                np.add(acc, t, out=acc)
                np.sqrt(acc, out=t)
                np.add(t, c.epsilon, out=t)
                np.divide(g, t, out=t)
                np.multiply(t, c.learning_rate * scale, out=t)
                np.subtract(p, t, out=p)
            else:
                self._adam_chunk(p, g, s[0], s[1], t, scale)

    def _adam_chunk(
        self,
        p: np.ndarray,
        g: np.ndarray,
        m: np.ndarray,
        v: np.ndarray,
        t: np.ndarray,
        scale: float,
    ) -> None:
        c = self.config
        t2 = self._scratch2[: t.size]
        np.multiply(g, scale, out=t)  # t = g
        np.multiply(m, c.beta1, out=m)
        np.multiply(t, 1 - c.beta1, out=t2)
        np.add(m, t2, out=m)  # m = b1 m + (1-b1) g
        np.multiply(t, t, out=t)
        np.multiply(v, c.beta2, out=v)
        np.multiply(t, 1 - c.beta2, out=t)
        np.add(v, t, out=v)  # v = b2 v + (1-b2) g^2
        bias1 = 1 - c.beta1**self.steps
        bias2 = 1 - c.beta2**self.steps
        np.multiply(v, 1 / bias2, out=t)
        np.sqrt(t, out=t)
        np.add(t, c.epsilon, out=t)  # t = sqrt(v_hat) + eps
        np.divide(m, t, out=t2)
        np.multiply(t2, c.learning_rate / bias1, out=t2)
        np.subtract(p, t2, out=p)

    def apply_dense(self, param: np.ndarray, grad: np.ndarray, scale: float = 1.0) -> None:
        self.apply(param.reshape(-1), grad.reshape(-1), [s.reshape(-1) for s in self.states], scale)

    def apply_rows(self, param: np.ndarray, rows: np.ndarray, grad: np.ndarray, scale: float = 1.0) -> None:
        """Update only `rows` of a 2-D parameter (rows unique); state rows follow."""
        p = param[rows]
        states = [s[rows] for s in self.states]
        self.apply(
            p.reshape(-1),
            np.ascontiguousarray(grad).reshape(-1),
            [s.reshape(-1) for s in states],
            scale,
        )
        param[rows] = p
        for state, rows_state in zip(self.states, states, strict=True):
            state[rows] = rows_state
