import numpy as np
import pytest

from nanodist.workers.comm import from_env
from nanodist.workers.model_parallel import Pipeline, Schedule, schedule, split_layers
from nanodist.workers.models import MLP


def test_balanced_split_minimises_the_heaviest_stage():
    sizes = (64, 256, 256, 64, 10)  # layers of 16640, 65792, 16448 and 650 parameters
    assert split_layers(sizes, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(sizes, 3) == [range(0, 1), range(1, 2), range(2, 4)]
    assert split_layers(sizes, 4) == [range(i, i + 1) for i in range(4)]


def test_a_given_split_is_checked():
    assert split_layers((8, 8, 8, 8), 2, [2, 1]) == [range(0, 2), range(2, 3)]
    with pytest.raises(ValueError, match="split"):
        split_layers((8, 8, 8, 8), 2, [3, 1])
    with pytest.raises(ValueError, match="3 layers"):
        split_layers((8, 8, 8, 8), 4)


@pytest.mark.parametrize("kind", list(Schedule))
@pytest.mark.parametrize(("stages", "micro"), [(2, 1), (2, 4), (3, 8), (4, 2)])
def test_every_stage_runs_each_micro_batch_forward_then_backward_once(kind, stages, micro):
    for stage in range(stages):
        ops = schedule(kind, stage, stages, micro)
        assert sorted(ops) == sorted([("F", m) for m in range(micro)] + [("B", m) for m in range(micro)])
        assert all(ops.index(("F", m)) < ops.index(("B", m)) for m in range(micro))
        assert [m for op, m in ops if op == "B"] == list(range(micro))  # the order neighbours rely on


def test_1f1b_holds_at_most_stages_minus_stage_activations():
    for stage in range(4):
        live, peak = 0, 0
        for op, _ in schedule(Schedule.ONE_F_ONE_B, stage, 4, 8):
            live += 1 if op == "F" else -1
            peak = max(peak, live)
        assert peak == 4 - stage
    assert max(schedule(Schedule.GPIPE, 0, 4, 8).count(("F", m)) for m in range(8)) == 1


@pytest.mark.parametrize("kind", list(Schedule))
def test_one_stage_with_micro_batches_equals_the_whole_batch_gradient(kind):
    model = MLP((64, 32, 16, 10))
    params = model.init(3)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((24, 64)).astype(np.float32), rng.integers(0, 10, 24)
    expected_loss, expected = model.loss_and_grads(params, x, y)
    loss, grads = Pipeline(from_env("single"), model, micro_batches=4, kind=kind).step(params, x, y)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for name, grad in expected.items():
        np.testing.assert_allclose(grads[name], grad, rtol=1e-4, atol=1e-6, err_msg=name)
