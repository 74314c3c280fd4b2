"""Uneven data under `nanodist run`, in each layout: rank 1 has half the batches of the others."""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import pytest

from tests.integration.test_torch import SCRIPTS, assert_ran, final_states, nanodist_run
from tests.integration.torch_scripts.uneven import SHORT_RANK, SHORT_STEPS, reference

pytestmark = pytest.mark.slow

LAYOUTS = {"tcp:2": 2, "mpi:2,tcp:2": 4, "mpi:4": 4}  # --groups: world size
SCRIPT = os.path.join(SCRIPTS, "uneven.py")


@pytest.mark.parametrize("way", ["join", "ddp"])
@pytest.mark.parametrize("groups", LAYOUTS)
def test_ranks_with_different_numbers_of_batches_finish_with_join(tmp_path, groups, way):
    """All ranks end identical, equal to one process trained on the batches that were taken."""
    world = LAYOUTS[groups]
    result = nanodist_run(tmp_path, "--groups", groups, SCRIPT, str(tmp_path), way)
    assert_ran(result)
    states = final_states(tmp_path, world)
    for name, value in reference(world).items():
        for rank, state in enumerate(states):
            np.testing.assert_array_equal(state[name], states[0][name], err_msg=f"rank {rank} differs: {name}")
        np.testing.assert_allclose(states[0][name], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    if way == "join":
        lasts = {json.loads((tmp_path / f"rank-{r}.json").read_text())["last"] for r in range(world)}
        (last,) = lasts  # every rank names the same one, and it is one that had all the batches
        assert last != SHORT_RANK and 0 <= last < world


@pytest.mark.parametrize("groups", LAYOUTS)
def test_a_rank_that_ends_without_join_is_named_and_the_job_stops(tmp_path, groups):
    result = nanodist_run(tmp_path, "--groups", groups, "--timeout", "120", SCRIPT, str(tmp_path), "none", timeout=300)
    ended = time.time()
    output = result.stdout + result.stderr
    (left,) = re.findall(rf"\[rank {SHORT_RANK}\] left at (\S+)", output)
    # Half the --timeout: the departure stopped the job, not a wait (it takes a second or two here).
    assert ended - float(left) < 60, output[-3000:]
    assert result.returncode != 0, output[-3000:]
    world = LAYOUTS[groups]
    assert f"rank {SHORT_RANK} left after step {SHORT_STEPS} while {world - 1} ranks are at step {SHORT_STEPS + 1}" in (
        output
    ), output[-3000:]
    assert "must call nd.join()" in output
