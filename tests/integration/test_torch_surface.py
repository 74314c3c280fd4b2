"""Horovod's surface beyond DistributedOptimizer, under `nanodist run` in each layout: frozen layers,
clipping between synchronize() and step(), and collectives on a script's own tensors and objects."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.integration.test_torch import SCRIPTS, assert_ran, final_states, nanodist_run
from tests.integration.torch_scripts.surface import reference

pytestmark = pytest.mark.slow

LAYOUTS = {"tcp:2": 2, "mpi:2,tcp:2": 4, "mpi:4": 4}  # --groups: world size


@pytest.mark.parametrize("groups", LAYOUTS)
def test_frozen_layers_clipping_and_collectives_match_one_process(tmp_path, groups):
    world = LAYOUTS[groups]
    result = nanodist_run(tmp_path, "--groups", groups, os.path.join(SCRIPTS, "surface.py"), str(tmp_path))
    assert_ran(result)
    states = final_states(tmp_path, world)
    expected, unclipped = reference(world, clip=True), reference(world, clip=False)
    for name, value in expected.items():
        for rank, state in enumerate(states):
            np.testing.assert_array_equal(state[name], states[0][name], err_msg=f"rank {rank} differs: {name}")
        np.testing.assert_allclose(states[0][name], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    # The frozen layer kept rank 0's init; clipping took effect (unclipped training ends elsewhere).
    np.testing.assert_array_equal(states[0]["0.weight"], unclipped["0.weight"].numpy())
    assert not np.allclose(states[0]["2.weight"], unclipped["2.weight"].numpy(), atol=1e-3)
    assert result.stdout.count("was frozen (requires_grad=False) or unnamed when DistributedOptimizer") == world

    # Each line whole, under exactly one prefix: its own rank's, an MPI group's ranks included.
    printed = [line for line in result.stdout.splitlines() if " of rank " in line]
    assert len(printed) == 20 * world, result.stdout[-3000:]
    for line in printed:
        assert re.fullmatch(r"\[rank (\d)\] line \d+ of rank \1: x{200}", line), line
    assert "[ranks " not in result.stdout, result.stdout[-3000:]

    outcomes = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(world)]
    mean = (world - 1) / 2
    for rank, got in enumerate(outcomes):
        assert got["average"] == [mean, 2 * mean] and got["max"] == [world - 1.0]
        assert got["sum"] == [world * (world + 1) // 2]
        assert got["allgather"] == [[r, r] for r in range(world) for _ in range(r + 1)]
        assert got["broadcast"] == [10.0 * (world - 1)]
        assert got["broadcast_object"] == {
            "epoch": 3,
            "lrs": [0.1, 0.01],
            "lrs_is_tuple": True,
            "int_key": True,
            "rank": 1,
            "counts": [0, 2, 4],
        }
        assert got["allgather_object"] == [{"rank": r, "name": f"r{r}"} for r in range(world)]
        assert ("refused" in got) == (rank == 0)
    assert "set cannot be sent" in outcomes[0]["refused"] and "never pickled" in outcomes[0]["refused"]


@pytest.mark.parametrize("example", ["horovod_style.py", "ddp_style.py"])
def test_the_porting_examples_train_with_uneven_shares(tmp_path, example):
    """docs/torch.md's porting examples, as a user runs them (1003 rows: the ranks' shares differ)."""
    result = nanodist_run(tmp_path, "--groups", "mpi:2,tcp:2", os.path.join(ROOT, "examples", example))
    assert_ran(result)
    (accuracy,) = re.findall(r"\[rank 0\] epoch 2: accuracy (\S+)", result.stdout)
    assert float(accuracy) >= 0.9, result.stdout[-3000:]
