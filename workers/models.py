"""Numpy models whose parameters are dicts of named arrays: one array, one parameter-server key."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class MLP:
    """Dense layers with ReLU between them and softmax cross-entropy on top.

    `sizes` = [inputs, hidden..., classes]; with no hidden layer this is softmax regression.
    """

    sizes: tuple[int, ...]
    dtype: type = np.float32

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or any(s < 1 for s in self.sizes):
            raise ValueError(f"an MLP needs at least input and output sizes >= 1, got {self.sizes}")

    @property
    def layers(self) -> int:
        return len(self.sizes) - 1

    def init(self, seed: int = 0) -> Params:
        """He-initialised weights and zero biases, deterministic for a seed."""
        rng = np.random.default_rng(seed)
        params: Params = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=True)):
            params[f"layer{i}/w"] = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(self.dtype)
            params[f"layer{i}/b"] = np.zeros(fan_out, dtype=self.dtype)
        return params

    def logits(self, params: Params, x: np.ndarray) -> np.ndarray:
        h = x
        for i in range(self.layers):
            h = h @ params[f"layer{i}/w"] + params[f"layer{i}/b"]
            if i < self.layers - 1:
                h = np.maximum(h, 0)
        return h

    def loss_and_grads(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        """Mean cross-entropy over the batch and its gradient for every parameter."""
        activations = [x]
        h = x
        for i in range(self.layers):
            h = h @ params[f"layer{i}/w"] + params[f"layer{i}/b"]
            if i < self.layers - 1:
                h = np.maximum(h, 0)
            activations.append(h)
        probs = softmax(h)
        n = x.shape[0]
        loss = float(-np.log(probs[np.arange(n), y] + 1e-12).mean())
        delta = probs
        delta[np.arange(n), y] -= 1
        delta /= n
        grads: Params = {}
        for i in reversed(range(self.layers)):
            grads[f"layer{i}/w"] = (activations[i].T @ delta).astype(self.dtype, copy=False)
            grads[f"layer{i}/b"] = delta.sum(axis=0).astype(self.dtype, copy=False)
            if i:
                delta = (delta @ params[f"layer{i}/w"].T) * (activations[i] > 0)
        return loss, grads

    def evaluate(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean loss, accuracy)."""
        logits = self.logits(params, x)
        probs = softmax(logits)
        loss = float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())
        return loss, float((logits.argmax(axis=1) == y).mean())


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def softmax_regression(inputs: int, classes: int, dtype: type = np.float32) -> MLP:
    return MLP((inputs, classes), dtype)
