"""An InitEntry, checked: a key's name, its first value or table, and its update rule."""

from __future__ import annotations

import math

import numpy as np

from nanodist.services.common.errors import invalid
from nanodist.services.common.validation import check_name
from nanodist.services.parameter_server.optimizers import OptimizerConfig
from nanodist.services.parameter_server.row_table import TableShape
from nanodist.services.parameter_server.store import Store
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec

MAX_TABLE_ROWS = 1 << 40


def prepare(entry: ps.InitEntry, path: str) -> tuple[str, np.ndarray | TableShape, OptimizerConfig]:
    check_name(entry.key, f"{path}.key")
    value: np.ndarray | TableShape
    if entry.HasField("table"):
        if entry.HasField("value"):
            raise invalid(f"{path}: set value or table, not both")
        value = _table(entry.table, f"{path}.table")
    elif not entry.HasField("value"):
        raise invalid(f"{path}.value: missing (or set table)")
    else:
        value = codec.from_proto(entry.value, f"{path}.value")
        if entry.value.dtype not in codec.FLOAT_DTYPES:
            raise invalid(f"{path}.value.dtype: parameters must be floating point, got {value.dtype.name}")
    return entry.key, value, OptimizerConfig.from_proto(entry.optimizer, f"{path}.optimizer")


def _table(spec: ps.TableSpec, path: str) -> TableShape:
    if not 0 < spec.rows <= MAX_TABLE_ROWS:
        raise invalid(f"{path}.rows: must be in [1, {MAX_TABLE_ROWS}], got {spec.rows}")
    if not 0 < spec.columns <= 1 << 20:
        raise invalid(f"{path}.columns: must be in [1, {1 << 20}], got {spec.columns}")
    if spec.dtype not in codec.FLOAT_DTYPES:
        raise invalid(f"{path}.dtype: tables must be floating point, got {spec.dtype}")
    if not 0 <= spec.first_row <= MAX_TABLE_ROWS:
        raise invalid(f"{path}.first_row: must be in [0, {MAX_TABLE_ROWS}], got {spec.first_row}")
    init = spec.initializer
    if init.kind not in ps.RowInitializer.Kind.values():
        raise invalid(f"{path}.initializer.kind: unknown initializer {init.kind}")
    if not (math.isfinite(init.scale) and init.scale >= 0):
        raise invalid(f"{path}.initializer.scale: must be finite and >= 0, got {init.scale}")
    return TableShape(
        rows=spec.rows,
        columns=spec.columns,
        dtype=codec.numpy_dtype(spec.dtype, f"{path}.dtype"),
        initializer=init.kind or ps.RowInitializer.NORMAL,
        scale=init.scale or 1.0,
        seed=init.seed,
        first_row=spec.first_row,
    )


def table_proto(shape: TableShape) -> ps.TableSpec:
    return ps.TableSpec(
        rows=shape.rows,
        columns=shape.columns,
        dtype=codec.proto_dtype(shape.dtype),  # type: ignore[arg-type]
        initializer=ps.RowInitializer(kind=shape.initializer, scale=shape.scale, seed=shape.seed),  # type: ignore[arg-type]
        first_row=shape.first_row,
    )


def apply_logged_init(store: Store, payload: bytes) -> None:
    """Apply an InitRequest as the write-ahead log or a primary's stream carries it (checked when it came)."""
    for i, entry in enumerate(ps.InitRequest.FromString(payload).entries):
        store.init(*prepare(entry, f"entries[{i}]"))
