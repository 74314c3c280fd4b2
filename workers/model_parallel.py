"""Pipeline parallelism: an MLP split into K stages, one per worker, fed micro-batches.

Stage s owns a contiguous run of layers. For every micro-batch, activations
flow forward from stage s to s+1 over the communicator's send/recv, and the
gradient of the loss with respect to them flows back. Two schedules:

- GPipe: every forward, then every backward. Stage s keeps all M micro-batches'
  activations.
- 1F1B: after K-1-s warm-up forwards, each forward is followed by one backward,
  so stage s keeps at most K-s micro-batches' activations.

Both give the same gradients, the mean over the whole batch, as one backward
pass over the whole batch would (up to float rounding). The idle fraction of
each stage (the bubble) is (K-1)/(M+K-1) in theory; `Pipeline.timings`
measures it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from nanodist.workers.comm import CommError, Communicator, SendHandle
from nanodist.workers.models import MLP, Params, softmax


class Schedule(StrEnum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"


def layer_params(sizes: tuple[int, ...]) -> list[int]:
    return [fan_in * fan_out + fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)]


def split_layers(sizes: tuple[int, ...], stages: int, split: list[int] | None = None) -> list[range]:
    """Contiguous layer ranges, one per stage: as given by `split` (layers per stage), or balanced so
    that the largest stage holds as few parameters as possible."""
    layers = len(sizes) - 1
    if stages < 1 or stages > layers:
        raise ValueError(f"{stages} pipeline stages need between 1 and {layers} layers per model; it has {layers}")
    if split is not None:
        if len(split) != stages or any(n < 1 for n in split) or sum(split) != layers:
            raise ValueError(f"split {split} must give each of {stages} stages >= 1 layer, {layers} in all")
        counts = split
    else:
        counts = _balanced(layer_params(sizes), stages)
    bounds = np.cumsum([0, *counts])
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _balanced(weights: list[int], stages: int) -> list[int]:
    """Layers per stage minimising the heaviest stage (dynamic programming over cut points)."""
    n = len(weights)
    prefix = np.cumsum([0, *weights])
    best: dict[tuple[int, int], tuple[int, list[int]]] = {
        (0, 0): (0, [])
    }  # (layers, stages) used -> (heaviest, counts)
    for used_stages in range(stages):
        for used in range(n):
            if (used, used_stages) not in best:
                continue
            heaviest, counts = best[(used, used_stages)]
            left = stages - used_stages - 1
            for end in range(used + 1, n - left + 1):
                candidate = (max(heaviest, int(prefix[end] - prefix[used])), [*counts, end - used])
                key = (end, used_stages + 1)
                if key not in best or candidate[0] < best[key][0]:
                    best[key] = candidate
    return best[(n, stages)][1]


def schedule(kind: Schedule, stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """The ("F" | "B", micro-batch) operations stage `stage` runs, in order."""
    forwards = [("F", m) for m in range(micro_batches)]
    backwards = [("B", m) for m in range(micro_batches)]
    if kind is Schedule.GPIPE:
        return forwards + backwards
    warmup = min(stages - stage - 1, micro_batches)
    ops = forwards[:warmup]
    for i in range(micro_batches - warmup):
        ops += [forwards[warmup + i], backwards[i]]
    return ops + backwards[micro_batches - warmup :]


def stage_key(stage: int, name: str) -> str:
    """Parameter-server key of a stage's parameter: stage-scoped, so replicas of stage s share it."""
    return f"stage{stage}/{name}"


@dataclass
class Timings:
    compute: float = 0.0  # seconds in forward and backward arithmetic
    comm: float = 0.0  # seconds in send and recv, waiting included
    steps: int = 0
    wall: float = 0.0  # seconds inside step()


@dataclass
class _Cache:
    inputs: list[np.ndarray] = field(default_factory=list)  # each local layer's input


class Pipeline:
    """This process's stage of a K-stage pipeline over `comm` (rank = stage)."""

    def __init__(
        self,
        comm: Communicator,
        model: MLP,
        micro_batches: int,
        kind: Schedule = Schedule.ONE_F_ONE_B,
        split: list[int] | None = None,
    ) -> None:
        self.comm = comm
        self.model = model
        self.stage, self.stages = comm.rank, comm.size
        self.layers = split_layers(model.sizes, self.stages, split)[self.stage]
        self.micro_batches = micro_batches
        self.ops = schedule(kind, self.stage, self.stages, micro_batches)
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.timings = Timings()
        self.peak_cached = 0  # most micro-batches whose activations were held at once
        self._sending: list[SendHandle] = []

    def param_names(self) -> list[str]:
        return [f"layer{i}/{p}" for i in self.layers for p in ("w", "b")]

    def keys(self) -> list[str]:
        return [stage_key(self.stage, name) for name in self.param_names()]

    # --- one stage's arithmetic ------------------------------------------

    def _forward(self, params: Params, h: np.ndarray, cache: _Cache) -> np.ndarray:
        for i in self.layers:
            cache.inputs.append(h)
            h = h @ params[f"layer{i}/w"] + params[f"layer{i}/b"]
            if i < self.model.layers - 1:
                h = np.maximum(h, 0)
        return h

    def _backward(self, params: Params, delta: np.ndarray, cache: _Cache, grads: Params) -> np.ndarray:
        """`delta` is dLoss/d(this stage's pre-activation output); returns dLoss/d(stage input)."""
        for i, inputs in zip(reversed(self.layers), reversed(cache.inputs), strict=True):
            grads[f"layer{i}/w"] += inputs.T @ delta
            grads[f"layer{i}/b"] += delta.sum(axis=0)
            if i == 0:
                break  # the model's input needs no gradient
            delta = (delta @ params[f"layer{i}/w"].T) * (inputs > 0)  # through the previous layer's ReLU
        return delta

    # --- the schedule ----------------------------------------------------

    def step(self, params: Params, x: np.ndarray | None, y: np.ndarray | None) -> tuple[float, Params]:
        """Run one batch through the schedule; returns (mean loss, this stage's gradients).

        Stage 0 reads `x`, the last stage reads `y`; the batch size must be a
        multiple of the micro-batch count. The loss is sent back from the last stage to every stage.
        """
        began = time.perf_counter()
        batch = len(y) if y is not None else len(_given(x, "x or y", self.stage))
        if batch % self.micro_batches:
            raise ValueError(f"batch of {batch} does not split into {self.micro_batches} equal micro-batches")
        size = batch // self.micro_batches
        widths = self.model.sizes
        grads: Params = {n: np.zeros_like(params[n]) for n in self.param_names()}
        caches: dict[int, _Cache] = {}
        outputs: dict[int, np.ndarray] = {}
        loss = np.zeros(1, dtype=np.float64)
        try:
            for op, m in self.ops:
                rows = slice(m * size, (m + 1) * size)
                if op == "F":
                    if self.first:
                        h = _given(x, "x", self.stage)[rows]
                    else:
                        h = self._recv((size, widths[self.layers[0]]), self.stage - 1)
                    tick = time.perf_counter()
                    caches[m] = _Cache()
                    out = self._forward(params, h, caches[m])
                    self.peak_cached = max(self.peak_cached, len(caches))
                    self.timings.compute += time.perf_counter() - tick
                    if self.last:
                        outputs[m] = out
                    else:
                        self._send(out, self.stage + 1)
                else:
                    if self.last:
                        tick = time.perf_counter()
                        probs = softmax(outputs.pop(m))
                        labels = _given(y, "y", self.stage)[rows]
                        loss += -np.log(probs[np.arange(size), labels] + 1e-12).sum()
                        probs[np.arange(size), labels] -= 1
                        delta = probs / batch  # the mean over the whole batch, not the micro-batch
                        self.timings.compute += time.perf_counter() - tick
                    else:
                        delta = self._recv((size, widths[self.layers[-1] + 1]), self.stage + 1)
                    tick = time.perf_counter()
                    back = self._backward(params, delta, caches.pop(m), grads)
                    self.timings.compute += time.perf_counter() - tick
                    if not self.first:
                        self._send(back, self.stage - 1)
            self._finish_sends()
            tick = time.perf_counter()
            self.comm.broadcast(loss, root=self.stages - 1)
            self.timings.comm += time.perf_counter() - tick
        except CommError as error:
            raise CommError(f"pipeline stage {self.stage} of {self.stages}: {_as_stages(str(error))}") from None
        self.timings.steps += 1
        self.timings.wall += time.perf_counter() - began
        return float(loss[0]) / batch, grads

    def _send(self, array: np.ndarray, dest: int) -> None:
        # Non-blocking: in 1F1B a stage sends an activation forward while its neighbour sends a
        # gradient back; two blocking sends of large messages would wait for each other forever.
        tick = time.perf_counter()
        self._sending.append(self.comm.isend(np.ascontiguousarray(array, dtype=self.model.dtype), dest))
        self.timings.comm += time.perf_counter() - tick

    def _finish_sends(self) -> None:
        tick = time.perf_counter()
        for handle in self._sending:
            handle.wait()
        self._sending.clear()
        self.timings.comm += time.perf_counter() - tick

    def _recv(self, shape: tuple[int, int], source: int) -> np.ndarray:
        tick = time.perf_counter()
        buffer: np.ndarray = np.empty(shape, dtype=self.model.dtype)
        self.comm.recv(buffer, source)
        self.timings.comm += time.perf_counter() - tick
        return buffer


def _given(array: np.ndarray | None, name: str, stage: int) -> np.ndarray:
    """Stage 0 reads the inputs and the last stage the labels; the stage's caller must pass them."""
    if array is None:
        raise ValueError(f"pipeline stage {stage} needs {name}")
    return array


def _as_stages(message: str) -> str:
    # In a pipeline group, rank r is stage r; say so in the words of the pipeline.
    return re.sub(r"\brank (\d+)", r"stage \1", message)
