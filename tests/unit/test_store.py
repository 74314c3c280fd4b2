import ml_dtypes
import numpy as np
import pytest

from nanodist.services.common.errors import ServiceError
from nanodist.services.parameter_server import checkpoint
from nanodist.services.parameter_server.optimizers import OptimizerConfig
from nanodist.services.parameter_server.store import Mode, Store
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire.codec import Entry, Membership

SGD1 = OptimizerConfig(learning_rate=1.0)


def store(mode: Mode, workers: int = 1, staleness: int = 0) -> Store:
    s = Store(mode, workers, staleness)
    s.init("w", np.zeros(2), SGD1)
    return s


def grad(*values: float) -> list[Entry]:
    return [Entry("w", dense=np.array(values, dtype=np.float64))]


def test_init_is_idempotent_and_first_writer_wins():
    s = store(Mode.ASP)
    assert s.init("w", np.ones(2), SGD1) == (False, 0)
    assert s.slots["w"].value.tolist() == [0, 0]


def test_asp_applies_each_push_at_once():
    s = store(Mode.ASP)
    assert s.push(grad(1, 2), worker_id=0, step=0).versions == [1]
    assert s.push(grad(1, 2), worker_id=5, step=0).versions == [2]
    assert s.slots["w"].value.tolist() == [-2, -4]


def test_bsp_applies_the_mean_once_all_workers_pushed_the_step():
    s = store(Mode.BSP, workers=3)
    assert not s.push(grad(3, 0), 0, 0).applied
    assert not s.push(grad(0, 3), 1, 0).applied
    assert s.slots["w"].version == 0 and s.slots["w"].value.tolist() == [0, 0]
    result = s.push(grad(3, 3), 2, 0)
    assert result.applied and result.versions == [1]
    assert s.slots["w"].value.tolist() == [-2, -2]
    assert s.slots["w"].pending == {}


def test_bsp_steps_in_turn_reuse_one_sum_and_stay_exact():
    s = store(Mode.BSP, workers=2)
    for step, (a, b) in enumerate([((2, 4), (0, 0)), ((1, 1), (3, 3)), ((0, 0), (0, 0))]):
        s.push(grad(*a), 0, step)
        s.push(grad(*b), 1, step)
    assert s.slots["w"].value.tolist() == [-3, -4]  # -(1+2+0), -(2+2+0): no sum carried into the next step


@pytest.mark.parametrize("half", [np.float16, ml_dtypes.bfloat16])
def test_bsp_sums_half_precision_pushes_in_float32(half: type) -> None:
    s = Store(Mode.BSP, 3, 0)
    s.init("avg", np.zeros(2, dtype=half), OptimizerConfig(kind=ps.Optimizer.AVERAGE))
    # Three times 30000 overflows float16; 256 + 1 + 1 rounds back to 256 in bfloat16's 8 bits, twice.
    pushes = [np.array(row, dtype=half) for row in ([30000, 256], [30000, 1], [30000, 1])]
    for worker, pushed in enumerate(pushes):
        s.push([Entry("avg", dense=pushed)], worker, 0)
    value = s.slots["avg"].value
    assert value.dtype == np.dtype(half)
    assert value.astype(np.float32).tolist() == np.array([30000, 86], dtype=half).astype(np.float32).tolist()


def test_bsp_rejects_a_second_push_of_the_same_step_by_a_worker():
    s = store(Mode.BSP, workers=2)
    s.push(grad(1, 1), 0, 0)
    with pytest.raises(ServiceError, match="already pushed step 0"):
        s.push(grad(1, 1), 0, 0)


def test_bsp_rejects_a_step_that_was_already_applied():
    s = store(Mode.BSP, workers=1)
    s.push(grad(1, 1), 0, 0)
    with pytest.raises(ServiceError, match="already applied"):
        s.push(grad(1, 1), 0, 0)


def test_bsp_keeps_steps_apart_when_a_worker_runs_ahead():
    s = store(Mode.BSP, workers=2)
    s.push(grad(2, 2), 0, 0)
    s.push(grad(10, 10), 0, 1)  # worker 0 already on step 1
    s.push(grad(4, 4), 1, 0)
    assert s.slots["w"].value.tolist() == [-3, -3] and s.slots["w"].version == 1
    s.push(grad(0, 0), 1, 1)
    assert s.slots["w"].value.tolist() == [-8, -8] and s.slots["w"].version == 2


def test_bsp_worker_ids_are_bounded():
    with pytest.raises(ServiceError, match=r"worker_id: 2 is outside \[0, 2\)"):
        store(Mode.BSP, workers=2).push(grad(1, 1), 2, 0)


def test_bsp_sparse_rows_average_and_touch_only_those_rows():
    s = Store(Mode.BSP, 2)
    s.init("t", np.zeros((3, 1)), SGD1)
    s.push([Entry("t", rows=np.array([0, 0]), values=np.array([[1.0], [1.0]]))], 0, 0)
    s.push([Entry("t", rows=np.array([2]), values=np.array([[4.0]]))], 1, 0)
    assert s.slots["t"].value.ravel().tolist() == [-1, 0, -2]


def test_ssp_pull_is_ready_only_within_the_staleness_bound():
    s = store(Mode.SSP, workers=2, staleness=1)
    slots = [s.slots["w"]]
    s.push(grad(0, 0), 0, 0)
    s.push(grad(0, 0), 0, 1)  # worker 0 at clock 2, worker 1 at clock 0
    assert s.ready(slots, 0, clock=1)  # 0 >= 1 - 1
    assert not s.ready(slots, 0, clock=2)  # needs slowest >= 1
    s.push(grad(0, 0), 1, 0)
    assert s.ready(slots, 0, clock=2)
    assert s.slowest_clock() == 1


def test_a_bad_entry_rejects_the_whole_push_and_changes_nothing():
    s = store(Mode.ASP)
    s.init("v", np.zeros(3), SGD1)
    with pytest.raises(ServiceError, match=r"entries\[1\].dense.shape"):
        s.push([Entry("v", dense=np.ones(3)), Entry("w", dense=np.ones(5))], 0, 0)
    assert s.slots["v"].value.tolist() == [0, 0, 0] and s.slots["v"].version == 0


def test_stale_fencing_token_is_refused():
    s = store(Mode.ASP)
    s.push(grad(1, 1), 0, 0, fencing_token=5)
    with pytest.raises(ServiceError, match="older than 5"):
        s.push(grad(1, 1), 0, 0, fencing_token=4)


def test_dedup_window_forgets_the_oldest_request():
    s = Store(dedup_window=2)
    for rid in ("a", "b", "c"):
        s.remember(rid, rid.encode())
    assert s.replay("a") is None and s.replay("c") == b"c"
    assert s.pushes_deduplicated == 1


GEN1_OF_3, GEN2_OF_2 = Membership(1, 3), Membership(2, 2)


def test_bsp_a_step_that_loses_a_member_completes_with_the_survivors_mean():
    s = store(Mode.BSP, workers=3)
    s.push(grad(9, 9), 0, 0, membership=GEN1_OF_3)
    s.push(grad(9, 9), 1, 0, membership=GEN1_OF_3)  # then worker 2 dies: the survivors form generation 2
    assert not s.push(grad(2, 0), 0, 0, membership=GEN2_OF_2).applied  # the generation-1 pushes are dropped
    assert s.push(grad(0, 4), 1, 0, membership=GEN2_OF_2).applied
    assert s.slots["w"].value.tolist() == [-1, -2]  # the mean of the two survivors' pushes


def test_a_push_of_a_generation_that_was_left_behind_is_refused_and_changes_nothing():
    s = store(Mode.BSP, workers=3)
    s.push(grad(1, 1), 0, 0, membership=GEN2_OF_2)
    with pytest.raises(ServiceError, match="generation: 1 is over; 'w' is pushed by generation 2") as refused:
        s.push(grad(5, 5), 2, 0, membership=GEN1_OF_3)
    assert refused.value.code.name == "FAILED_PRECONDITION"
    assert list(s.slots["w"].pending[0].workers) == [0]


def test_a_generation_bounds_the_worker_ids_by_its_pushers():
    s = store(Mode.BSP, workers=2)
    s.push(grad(1, 1), 3, 0, membership=Membership(1, 4))  # a grown generation: ids past --num-workers
    with pytest.raises(ServiceError, match=r"worker_id: 4 is outside \[0, 4\) for bsp with 4 pushers"):
        s.push(grad(1, 1), 4, 0, membership=Membership(1, 4))


def test_ssp_forgets_the_clock_of_a_worker_that_left():
    s = store(Mode.SSP, workers=3, staleness=0)
    for worker in (0, 1):
        s.push(grad(1, 1), worker, 0, membership=GEN1_OF_3)
    assert s.slowest_clock() == 0  # worker 2 never pushed, and never will
    s.push(grad(1, 1), 0, 1, membership=GEN2_OF_2)
    s.push(grad(1, 1), 1, 1, membership=GEN2_OF_2)
    assert s.slowest_clock() == 2 and s.ready([s.slots["w"]], 0, clock=2)


def test_a_checkpoint_keeps_the_generation_and_the_steps_it_collects(tmp_path):
    s = store(Mode.BSP, workers=3)
    s.push(grad(2, 0), 0, 0, membership=GEN2_OF_2)
    checkpoint.write(str(tmp_path), checkpoint.snapshot(s))
    restarted = Store(Mode.BSP, 3)
    checkpoint.restore(str(tmp_path), restarted)
    with pytest.raises(ServiceError, match="generation: 1 is over"):
        restarted.push(grad(1, 1), 2, 0, membership=GEN1_OF_3)
    assert restarted.push(grad(0, 4), 1, 0, membership=GEN2_OF_2).applied  # two pushers, as before the restart
    assert restarted.slots["w"].value.tolist() == [-1, -2]


def test_a_step_completed_before_a_loss_and_pushed_again_by_the_survivors_is_applied_once():
    s = store(Mode.BSP, workers=1)
    s.push(grad(2, 2), 0, 0, membership=Membership(1, 1))  # this shard completed step 0; the leader died
    again = s.push(grad(5, 5), 0, 0, membership=Membership(2, 1))  # its successor pushes step 0 again
    assert again.versions == [1] and s.slots["w"].value.tolist() == [-2, -2]
    assert s.push(grad(1, 1), 0, 1, membership=Membership(2, 1)).versions == [2]  # and training goes on
