"""Retries of UNAVAILABLE calls with capped exponential backoff and full jitter."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry only UNAVAILABLE (the request never reached a live server), for a bounded total time."""

    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    total_seconds: float = 30.0

    def call(self, attempt: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.total_seconds
        backoff = self.initial_backoff
        while True:
            try:
                return attempt()
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                pause = random.uniform(0, backoff)
                if time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)
                backoff = min(backoff * 2, self.max_backoff)


NO_RETRY = RetryPolicy(total_seconds=0)
