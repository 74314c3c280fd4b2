"""Named tensors as views into one contiguous array."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class FlatBuffer:
    """Parameters (or gradients) as views into one contiguous array, so a collective moves them in one call."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype) -> None:
        sizes = {k: int(np.prod(s)) for k, s in shapes.items()}
        self.data = np.zeros(sum(sizes.values()), dtype=dtype)
        self.views: dict[str, np.ndarray] = {}
        offset = 0
        for key, shape in shapes.items():
            self.views[key] = self.data[offset : offset + sizes[key]].reshape(shape)
            offset += sizes[key]

    def load(self, values: Mapping[str, np.ndarray]) -> None:
        for key, view in self.views.items():
            if values[key] is not view:  # a pull with out=views already landed there
                np.copyto(view, values[key])
