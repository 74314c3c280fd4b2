"""Gradient compression on the wire: gradients travel as 16-bit floats and are averaged in them."""

from __future__ import annotations

from enum import Enum

import torch


class Compression(Enum):
    """`none` sends gradients as they are; `fp16` and `bf16` halve the bytes of float32 gradients.

    The wrapped optimizer always sees gradients in the parameter's dtype.
    """

    none = None
    fp16 = torch.float16
    bf16 = torch.bfloat16

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a bucket of `dtype` travels in: compression narrows only wider floats."""
        if self.value is None or not dtype.is_floating_point or torch.finfo(dtype).bits <= 16:
            return dtype
        return self.value

    def group_dtype(self, dtype: torch.dtype, mpi: bool) -> torch.dtype:
        """The dtype a group reduces in. Groups share a machine, where bytes are cheap and 16-bit sums
        are not (numpy adds float16 without SIMD, and neither numpy nor MPI adds bfloat16), so they
        reduce in the parameter's dtype; the hop to the servers is what compression narrows."""
        return dtype

    @classmethod
    def parse(cls, value: Compression | str | None) -> Compression:
        if isinstance(value, Compression):
            return value
        if value is None:
            return cls.none
        try:
            return cls[value]
        except KeyError:
            raise ValueError(f"compression {value!r} is unknown; choose none, fp16 or bf16") from None
