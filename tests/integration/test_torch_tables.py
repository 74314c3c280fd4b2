"""nd.Embedding and nd.EmbeddingBag with real services and workers, launched by `nanodist run`."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.integration.test_torch import SCRIPTS, assert_ran, final_states, nanodist_run
from tests.integration.torch_scripts.tables import reference


@pytest.mark.parametrize(
    ("layout", "optimizer", "kind", "prefetch"),
    [
        ("hierarchical", "adagrad", "embedding", "1"),
        ("hierarchical", "sgd", "bag", "0"),
        ("flat", "sgd", "embedding", "0"),
        ("flat", "adagrad", "bag", "1"),
    ],
)
def test_bsp_tables_equal_single_process_sparse_torch(tmp_path, layout, optimizer, kind, prefetch):
    """Rows on both shards and ids repeated in every batch: every rank reads the same table, equal to
    torch's sparse embedding with the same optimizer on the combined batch, and the same dense head."""
    flat = ["--flat"] if layout == "flat" else []
    steps = 5
    script = os.path.join(SCRIPTS, "table_training.py")
    result = nanodist_run(
        tmp_path, "--groups", "mpi:2,tcp:2", *flat, script, str(tmp_path), optimizer, kind, str(steps), prefetch
    )
    assert_ran(result)
    states = final_states(tmp_path, 4)
    head, rows = reference(optimizer, kind, steps, world=4)
    for rank, state in enumerate(states):
        np.testing.assert_array_equal(state["rows"], states[0]["rows"], err_msg=f"rank {rank} reads other rows")
    np.testing.assert_allclose(states[0]["rows"], rows.numpy(), rtol=1e-5, atol=1e-6)
    for name, value in head.items():
        np.testing.assert_allclose(states[0][f"head.{name}"], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
