"""NaN and Inf are refused wherever they sit, large finite values are not, and the check needs no big temporary."""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from nanodist.services.common.errors import ServiceError
from nanodist.services.parameter_server.optimizers import CHUNK_ELEMENTS, OptimizerConfig
from nanodist.services.parameter_server.store import Limits, Mode, Store, all_finite
from nanodist.wire.codec import Entry

DTYPES = [np.float16, np.float32, np.float64]
SIZE = 3 * CHUNK_ELEMENTS + 5  # several chunks and a short last one
PLACES = {"first": 0, "middle": SIZE // 2, "chunk edge": CHUNK_ELEMENTS, "last": SIZE - 1}


def store_with(dtype: type[np.floating], size: int = SIZE, limits: Limits | None = None) -> Store:
    store = Store(Mode.ASP, limits=limits)
    store.init("w", np.zeros(size, dtype=dtype), OptimizerConfig(learning_rate=1.0))
    store.init("table", np.zeros((8, 4), dtype=dtype), OptimizerConfig(learning_rate=1.0))
    return store


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_value_anywhere_is_refused(dtype: type[np.floating], where: str, bad: float) -> None:
    store = store_with(dtype)
    grad = np.ones(SIZE, dtype=dtype)
    grad[PLACES[where]] = bad
    with pytest.raises(ServiceError) as raised:
        store.push([Entry("w", dense=grad)], worker_id=0, step=0)
    assert raised.value.message == "entries[0]: the gradient of 'w' holds NaN or Inf (--allow-nonfinite accepts it)"
    assert store.slots["w"].version == 0 and not store.slots["w"].value.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_nonfinite_sparse_row_is_refused(dtype: type[np.floating]) -> None:
    store = store_with(dtype)
    values = np.ones((2, 4), dtype=dtype)
    values[1, 3] = np.nan
    with pytest.raises(ServiceError, match="holds NaN or Inf"):
        store.push([Entry("table", rows=np.array([1, 5]), values=values)], worker_id=0, step=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_finite_values_whose_sum_overflows_are_accepted(dtype: type[np.floating]) -> None:
    store = store_with(dtype)
    biggest = np.finfo(dtype).max
    grad = np.full(SIZE, biggest, dtype=dtype)
    grad[::2] = -biggest
    with np.errstate(over="ignore"):
        assert np.isinf(np.sum(grad[1::2], dtype=dtype))  # a sum-based check would have refused this
    assert store.push([Entry("w", dense=grad)], worker_id=0, step=0).versions == [1]


def test_the_allow_nonfinite_flag_lets_them_through() -> None:
    store = store_with(np.float32, limits=Limits(reject_nonfinite=False))
    grad = np.full(SIZE, np.nan, dtype=np.float32)
    assert store.push([Entry("w", dense=grad)], worker_id=0, step=0).versions == [1]


@pytest.mark.parametrize("where", PLACES)
def test_bfloat16_is_checked_too(where: str) -> None:
    grad = np.ones(SIZE, dtype=ml_dtypes.bfloat16)
    assert all_finite(grad)
    grad[PLACES[where]] = np.nan
    assert not all_finite(grad)


def test_edge_shapes() -> None:
    assert all_finite(np.zeros(0, np.float32))
    assert all_finite(np.zeros((0, 3), np.float64))
    assert not all_finite(np.array(np.nan))
    assert all_finite(np.arange(10))  # integers cannot hold NaN


def test_the_check_allocates_no_temporary_the_size_of_the_gradient() -> None:
    store = store_with(np.float32, size=4 << 20)
    grad = np.ones(4 << 20, dtype=np.float32)  # 16 MiB; a full boolean mask would take 4 MiB
    tracemalloc.start()
    try:
        store.check_push([Entry("w", dense=grad)], worker_id=0, step=0, fencing_token=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * CHUNK_ELEMENTS, f"the check allocated {peak} bytes"
