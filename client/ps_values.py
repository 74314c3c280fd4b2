"""What ParameterServerClient.push takes besides dense arrays, and what pull returns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SparseGradient:
    """Gradient rows of a 2-D key: values[i] belongs to row rows[i]."""

    rows: np.ndarray
    values: np.ndarray


class Values(dict[str, np.ndarray]):
    """Pulled values by key (read-only views of the received message), with their versions.

    `slowest_clock` is the lowest worker clock the shards reported (SSP/BSP bookkeeping).
    """

    def __init__(
        self,
        items: Iterable[tuple[str, np.ndarray]] = (),
        versions: dict[str, int] | None = None,
        slowest_clock: int = 0,
    ) -> None:
        super().__init__(items)
        self.versions: dict[str, int] = {} if versions is None else versions
        self.slowest_clock = slowest_clock
