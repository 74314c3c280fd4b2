"""Pure logic of embedding tables: the row index, the row-id wire encoding, the placement of ids, the
per-row initializer."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nanodist.client.tables import Table
from nanodist.row_init import NORMAL, UNIFORM, initial_rows
from nanodist.services.parameter_server.row_table import RowIndex
from nanodist.v1 import tensor_pb2
from nanodist.wire import framing

ints64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(st.lists(st.lists(st.integers(0, 10**12), max_size=300), max_size=12), st.lists(st.integers(0, 10**12)))
@settings(max_examples=60, deadline=None)
def test_the_row_index_finds_what_was_added_and_nothing_else(batches, probes):
    index, truth = RowIndex(), {}
    for batch in batches:
        new = [r for r in dict.fromkeys(batch) if r not in truth]
        places = np.arange(len(truth), len(truth) + len(new))
        index.add(np.array(new, dtype=np.int64), places)
        truth.update(zip(new, places.tolist(), strict=True))
    asked = np.array(list(truth) + probes, dtype=np.int64)
    assert index.find(asked).tolist() == [truth.get(r, -1) for r in asked.tolist()]


@given(st.lists(ints64, max_size=200))
def test_row_ids_encode_as_protobuf_packed_varints(rows):
    array = np.array(rows, dtype=np.int64)
    encoded = framing.packed_int_array(1, array)
    assert encoded == tensor_pb2.SparseRows(rows=rows).SerializeToString()
    if rows:
        (field,) = framing.fields(memoryview(encoded), 0, len(encoded))
        assert framing.read_int_array(memoryview(encoded), field).tolist() == rows


def test_ids_map_to_every_part_in_order_and_back():
    table = Table.plan("t", 10, 4, np.dtype(np.float32), shards=3)  # parts [0, 3), [3, 6), [6, 10)
    ids = np.array([9, 0, 5, 3, 0])
    split = table.split(ids)
    assert [part for part, _, _ in split] == [0, 1, 2]
    rebuilt = np.empty_like(ids)
    for part, local, positions in split:
        rebuilt[positions] = local + table.bounds[part]
    assert rebuilt.tolist() == ids.tolist()
    assert [local.tolist() for _, local, _ in split] == [[0, 0], [2, 0], [3]]


def test_a_rows_first_value_depends_only_on_seed_row_and_columns():
    rows = np.array([0, 7, 10**9])
    normal = initial_rows(rows, 16, kind=NORMAL, scale=0.5, seed=3)
    assert np.array_equal(normal[1], initial_rows(np.array([7]), 16, kind=NORMAL, scale=0.5, seed=3)[0])
    assert not np.array_equal(normal, initial_rows(rows, 16, kind=NORMAL, scale=0.5, seed=4))
    many = initial_rows(np.arange(20_000), 16, kind=NORMAL, scale=0.5, seed=3)
    assert abs(many.mean()) < 0.01 and abs(many.std() - 0.5) < 0.01
    uniform = initial_rows(np.arange(20_000), 8, kind=UNIFORM, scale=0.1, seed=0)
    assert -0.1 <= uniform.min() and uniform.max() < 0.1 and abs(uniform.std() - 0.1 / np.sqrt(3)) < 0.002
