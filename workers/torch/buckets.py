"""Gradient buckets: parameters packed into flat buffers, one collective per bucket.

As in DDP, parameters are assigned to buckets in reverse registration order,
since backward produces the last layers' gradients first; a bucket holds one
dtype and is closed once it reaches the size cap. Each bucket ends with one
presence slot per parameter (1 where this rank produced a gradient), which
travels through the same averaging: after it, a slot above zero means some
worker had a gradient, and zero means none did, so the parameter keeps no
gradient on every rank, exactly as in single-process training. A last slot
holds 1 on a rank that contributes to this step and 0 on one that has joined
(nd.join: it ran out of data), so that after the averaging every rank knows
how many contributed, and scales the average to theirs alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb


@dataclass(eq=False)  # identity: a slot is a dictionary key
class Slot:
    """One parameter's place in its bucket."""

    name: str
    param: torch.Tensor
    offset: int
    numel: int
    presence: int  # index of its presence slot in the bucket's buffer


@dataclass
class Bucket:
    index: int
    dtype: torch.dtype
    slots: list[Slot] = field(default_factory=list)
    buffer: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    ready: int = 0  # parameters whose gradient has been copied in this step

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)

    @property
    def active(self) -> int:
        """Index of the slot that counts the ranks contributing to this step."""
        return self.numel + len(self.slots)

    def view(self, slot: Slot) -> torch.Tensor:
        return self.buffer[slot.offset : slot.offset + slot.numel].view(slot.param.shape)

    def reset(self) -> None:
        """Before a step: no gradient seen yet, presence and contribution slots cleared."""
        self.ready = 0
        self.buffer[self.numel :].zero_()


def assign(named: list[tuple[str, torch.Tensor]], cap_bytes: int) -> list[Bucket]:
    """Buckets of parameters in reverse order, split by dtype and by `cap_bytes`."""
    if cap_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {cap_bytes}")
    buckets: list[Bucket] = []
    open_by_dtype: dict[torch.dtype, Bucket] = {}
    for name, param in reversed(named):
        bucket = open_by_dtype.get(param.dtype)
        size = param.numel() * param.element_size()
        if bucket is None or (bucket.slots and (bucket.numel * param.element_size() + size) > cap_bytes):
            bucket = Bucket(index=len(buckets), dtype=param.dtype)
            buckets.append(bucket)
            open_by_dtype[param.dtype] = bucket
        bucket.slots.append(Slot(name, param, bucket.numel, param.numel(), 0))
    for bucket in buckets:
        total = bucket.numel
        for i, slot in enumerate(bucket.slots):
            slot.presence = total + i
        # Host memory: the collectives and the wire work on numpy views of it.
        bucket.buffer = torch.zeros(total + len(bucket.slots) + 1, dtype=bucket.dtype)
    return buckets
