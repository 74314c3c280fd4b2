import numpy as np
import pytest

from nanodist.workers.data import ShardSampler, load_digits
from nanodist.workers.models import MLP, softmax_regression


@pytest.mark.parametrize("model", [MLP((6, 5, 4, 3), np.float64), softmax_regression(6, 3, np.float64)])
def test_gradients_match_numerical_differentiation(model):
    rng = np.random.default_rng(0)
    params = model.init(seed=1)
    params = {k: v + rng.standard_normal(v.shape) * 0.1 for k, v in params.items()}  # nonzero biases
    x, y = rng.standard_normal((8, 6)), rng.integers(0, 3, 8)
    _, grads = model.loss_and_grads(params, x, y)
    eps = 1e-6
    for key, value in params.items():
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            original = value[index]
            value[index] = original + eps
            plus, _ = model.loss_and_grads(params, x, y)
            value[index] = original - eps
            minus, _ = model.loss_and_grads(params, x, y)
            value[index] = original
            numeric[index] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(grads[key], numeric, rtol=1e-5, atol=1e-8, err_msg=key)


def test_parameters_are_named_arrays_one_per_key():
    params = MLP((64, 32, 10)).init()
    assert {k: v.shape for k, v in params.items()} == {
        "layer0/w": (64, 32),
        "layer0/b": (32,),
        "layer1/w": (32, 10),
        "layer1/b": (10,),
    }
    assert all(v.dtype == np.float32 for v in params.values())


def test_digits_load_without_download_with_a_fixed_split():
    a, b = load_digits(), load_digits()
    assert a.x_train.shape == (1437, 64) and a.x_test.shape == (360, 64)
    assert np.array_equal(a.y_test, b.y_test) and a.classes == 10
    assert 0 <= a.x_train.min() and a.x_train.max() <= 1


def test_shards_are_disjoint_cover_everything_and_reshuffle_each_epoch():
    world = 4
    samplers = [ShardSampler(1437, r, world, seed=3) for r in range(world)]
    epoch0 = [s.indices(0) for s in samplers]
    assert len({len(e) for e in epoch0}) == 1
    covered = np.concatenate(epoch0)
    assert set(covered) == set(range(1437))
    assert len(covered) - len(set(covered)) == world * samplers[0].shard_size - 1437  # only the wrap padding
    assert not np.array_equal(samplers[0].indices(0), samplers[0].indices(1))
    assert np.array_equal(ShardSampler(1437, 2, world, seed=3).indices(5), samplers[2].indices(5))


def test_shard_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="batch size 500 exceeds the shard of 360 samples"):
        ShardSampler(1437, 0, 4).batches(0, 500)
    with pytest.raises(ValueError, match="only 3 samples"):
        ShardSampler(3, 0, 4)
