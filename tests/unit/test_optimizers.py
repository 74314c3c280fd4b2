import math

import numpy as np
import pytest

from nanodist.services.parameter_server.optimizers import CHUNK_ELEMENTS, Optimizer, OptimizerConfig
from nanodist.v1 import parameter_server_pb2 as ps


def run(kind, grads, **config):
    param = np.array([1.0, -2.0])
    opt = Optimizer(OptimizerConfig(kind=kind, **config), param)
    for g in grads:
        opt.apply_dense(param, np.array(g))
    return param


def test_sgd_by_hand():
    # w = [1, -2]; g = [0.5, 1]; lr 0.1 -> [0.95, -2.1]; again g = [1, -1] -> [0.85, -2.0]
    assert run(ps.Optimizer.SGD, [[0.5, 1.0], [1.0, -1.0]], learning_rate=0.1) == pytest.approx([0.85, -2.0])


def test_momentum_by_hand():
    # v1 = g1 = [0.5, 1]; w = [0.95, -2.1]; v2 = 0.9 v1 + g2 = [1.45, -0.1]; w = [0.805, -2.09]
    got = run(ps.Optimizer.MOMENTUM, [[0.5, 1.0], [1.0, -1.0]], learning_rate=0.1, momentum=0.9)
    assert got == pytest.approx([0.805, -2.09])


def test_adagrad_by_hand():
    # s1 = [0.25, 1]; w -= 0.1 * g / sqrt(s) = 0.1 * [1, 1] -> [0.9, -2.1]
    # s2 = [1.25, 2]; w -= 0.1 * [1/sqrt(1.25), -1/sqrt(2)]
    got = run(ps.Optimizer.ADAGRAD, [[0.5, 1.0], [1.0, -1.0]], learning_rate=0.1, epsilon=0.0)
    assert got == pytest.approx([0.9 - 0.1 / math.sqrt(1.25), -2.1 + 0.1 / math.sqrt(2)])


def test_adam_by_hand():
    b1, b2, lr = 0.9, 0.999, 0.1
    # step 1: m = 0.1 g, v = 0.001 g^2; m_hat = g, v_hat = g^2 -> w -= lr * sign(g)
    # step 2 for element 0: g1 = 0.5, g2 = 1
    m = b1 * (1 - b1) * 0.5 + (1 - b1) * 1.0
    v = b2 * (1 - b2) * 0.25 + (1 - b2) * 1.0
    m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
    expected0 = 1.0 - lr - lr * m_hat / math.sqrt(v_hat)
    got = run(
        ps.Optimizer.ADAM,
        [[0.5, 1.0], [1.0, -1.0]],
        learning_rate=lr,
        beta1=b1,
        beta2=b2,
        epsilon=0.0,
    )
    assert got[0] == pytest.approx(expected0)


@pytest.mark.parametrize("kind", [ps.Optimizer.SGD, ps.Optimizer.MOMENTUM, ps.Optimizer.ADAM, ps.Optimizer.ADAGRAD])
def test_chunked_update_matches_a_whole_array_reference(kind):
    rng = np.random.default_rng(1)
    size = CHUNK_ELEMENTS * 2 + 17  # crosses chunk boundaries
    param = rng.standard_normal(size)
    grads = [rng.standard_normal(size) for _ in range(3)]
    chunked = param.copy()
    opt = Optimizer(OptimizerConfig(kind=kind, learning_rate=0.01), chunked)
    for g in grads:
        opt.apply_dense(chunked, g)
    # reference: apply element-wise on small pieces with independent optimizers
    reference = param.copy()
    for start in range(0, size, 1000):
        piece = reference[start : start + 1000]
        ref_opt = Optimizer(OptimizerConfig(kind=kind, learning_rate=0.01), piece)
        for g in grads:
            ref_opt.apply_dense(piece, g[start : start + 1000])
    np.testing.assert_allclose(chunked, reference, rtol=1e-12)


def test_scale_averages_the_gradient():
    param = np.array([1.0])
    Optimizer(OptimizerConfig(learning_rate=1.0), param).apply_dense(param, np.array([4.0]), scale=0.25)
    assert param.tolist() == [0.0]


def test_row_update_touches_only_those_rows_and_their_state():
    table = np.ones((4, 2))
    opt = Optimizer(OptimizerConfig(kind=ps.Optimizer.MOMENTUM, learning_rate=0.5, momentum=0.9), table)
    opt.apply_rows(table, np.array([1, 3]), np.array([[1.0, 1.0], [2.0, 2.0]]))
    assert table.tolist() == [[1, 1], [0.5, 0.5], [1, 1], [0, 0]]
    assert opt.states[0].tolist() == [[0, 0], [1, 1], [0, 0], [2, 2]]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("learning_rate", 0.0, "learning_rate"),
        ("learning_rate", float("nan"), "learning_rate"),
        ("momentum", 1.5, "momentum"),
        ("kind", 9, "unknown optimizer"),
    ],
)
def test_invalid_configs_are_rejected(field, value, error):
    message = ps.Optimizer(learning_rate=0.1)
    setattr(message, field, value)
    with pytest.raises(Exception, match=error):
        OptimizerConfig.from_proto(message, "optimizer")
