"""nd.Embedding and nd.EmbeddingBag with real services and workers, launched by `nanodist run`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.integration.test_torch import SCRIPTS, assert_ran, final_states, nanodist_run
from tests.integration.torch_scripts.tables import reference

pytestmark = pytest.mark.slow  # trains, or runs the whole cluster: make test, not test-fast


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


def test_a_50m_row_table_trains_through_two_workers_that_never_hold_it(tmp_path):
    """50M x 16 float32 is 3.2 GB (6.4 GB with Adagrad's state): each worker stays under 1.5 GiB and the
    servers hold only the rows that were pushed."""
    rows, steps = 50_000_000, 30
    script = os.path.join(SCRIPTS, "big_table.py")
    result = nanodist_run(tmp_path, "--groups", "tcp:2", script, str(tmp_path), str(rows), str(steps))
    assert_ran(result)
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert report["peak_rss_bytes"] < 1.5 * 2**30, f"rank {rank} peaked at {report['peak_rss_bytes'] >> 20} MiB"
    assert reports[0]["rows_held"] == reports[0]["rows_touched"] > 0
    losses = reports[0]["losses"]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # it learns


def test_an_out_of_range_id_fails_on_the_worker_naming_the_table(tmp_path):
    script = os.path.join(SCRIPTS, "big_table.py")
    result = nanodist_run(tmp_path, "--groups", "tcp:2", script, str(tmp_path), "1000", "2", "out-of-range")
    assert result.returncode != 0
    assert "table 'huge': id 1000 is out of range [0, 1000)" in result.stderr
    assert "rank 0 failed" in result.stderr or "rank 1 failed" in result.stderr


def test_the_ctr_example_learns_the_click_log_close_to_its_ground_truth(tmp_path):
    """examples/ctr.py as `make demo-ctr` runs it: held-out AUC rises and ends near the ground truth's own."""
    example = os.path.join(os.path.dirname(SCRIPTS), "..", "..", "examples", "ctr.py")
    result = nanodist_run(
        tmp_path, "--groups", "tcp:2", "--run-id", "ctr", example, "--samples", "200000", "--evaluations", "2"
    )
    assert_ran(result)
    metrics = json.loads((tmp_path / "runs" / "ctr" / "metrics.json").read_text())
    aucs = [e["test_auc"] for e in metrics["evaluations"]]
    assert len(aucs) == 2 and aucs[1] > aucs[0], aucs
    assert aucs[1] > metrics["ground_truth_auc"] - 0.06, (aucs, metrics["ground_truth_auc"])
    assert (tmp_path / "runs" / "ctr" / "training.png").stat().st_size > 0
