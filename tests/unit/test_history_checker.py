"""The history checker on hand-made histories that are, and are not, linearizable (or mutually exclusive,
FIFO, fenced, released together)."""

from __future__ import annotations

import pytest

from tests.history import NEVER, Arrival, History, Hold, Operation, check_barriers, check_linearizable, check_locks


def op(process: str, action: str, argument, result, start: float, end: float = NEVER, key: str = "k") -> Operation:
    return Operation(process, action, key, argument, result, start, end)


def test_sequential_register_reads_are_linearizable():
    assert check_linearizable([op("a", "set", "1", None, 0, 1), op("b", "get", None, "1", 2, 3)]) == []


def test_a_read_of_a_value_overwritten_before_it_started_is_not():
    history = [
        op("a", "set", "1", None, 0, 1),
        op("a", "set", "2", None, 2, 3),
        op("b", "get", None, "1", 4, 5),  # "2" was set before this read began
    ]
    (failure,) = check_linearizable(history)
    assert "key 'k'" in failure and "get" in failure


def test_concurrent_writes_may_be_read_in_either_order():
    writes = [op("a", "set", "1", None, 0, 10), op("b", "set", "2", None, 1, 9)]
    assert check_linearizable([*writes, op("c", "get", None, "1", 11, 12)]) == []
    assert check_linearizable([*writes, op("c", "get", None, "2", 11, 12)]) == []
    # Two later reads that disagree cannot both hold: once "1" is read after both writes, "2" is gone.
    reads = [op("c", "get", None, "1", 11, 12), op("d", "get", None, "2", 13, 14)]
    assert check_linearizable([*writes, *reads]) != []


def test_counters_hand_out_each_value_once():
    good = [op("a", "add", 1, 1, 0, 2), op("b", "add", 1, 2, 1, 3), op("c", "add", 1, 3, 4, 5)]
    assert check_linearizable(good) == []
    twice = [op("a", "add", 1, 1, 0, 2), op("b", "add", 1, 1, 1, 3)]
    assert check_linearizable(twice) != []
    # b finished before c began, so c's add cannot come first.
    reordered = [op("b", "add", 1, 2, 0, 1), op("c", "add", 1, 1, 2, 3)]
    assert check_linearizable(reordered) != []


def test_an_unanswered_call_may_or_may_not_have_taken_effect():
    lost = op("a", "add", 1, None, 0)  # its server was killed: no end, no result
    assert check_linearizable([lost, op("b", "add", 1, 1, 1, 2)]) == []  # it did not happen (or later)
    assert check_linearizable([lost, op("b", "add", 1, 2, 1, 2)]) == []  # it happened first
    assert check_linearizable([lost, op("b", "add", 1, 3, 1, 2)]) != []  # there was only one


def test_compare_and_swap_and_delete():
    history = [
        op("a", "cas", (None, "x"), (True, "x"), 0, 1),
        op("b", "cas", (None, "y"), (False, "x"), 2, 3),
        op("a", "delete", None, True, 4, 5),
        op("b", "delete", None, False, 6, 7),
        op("b", "get", None, None, 8, 9),
    ]
    assert check_linearizable(history) == []
    two_winners = [op("a", "cas", (None, "x"), (True, "x"), 0, 2), op("b", "cas", (None, "y"), (True, "y"), 1, 3)]
    assert check_linearizable(two_winners) != []


def test_keys_are_checked_apart_and_named():
    history = [op("a", "set", "1", None, 0, 1, key="good"), op("a", "get", None, "2", 2, 3, key="bad")]
    (failure,) = check_linearizable(history)
    assert failure.startswith("key 'bad'")


def test_a_thousand_overlapping_adds_check_clean():
    # 4 clients, 250 adds each, overlapping in pairs: the memo keeps the search linear in practice.
    history = []
    for n in range(1000):
        start = n * 1.0
        history.append(op(f"p{n % 4}", "add", 1, n + 1, start, start + 1.5))
    assert check_linearizable(history) == []


def hold(process: str, token: int, requested: float, granted: float, until: float, **kwargs) -> Hold:
    return Hold(process, kwargs.get("lock", "L"), token, kwargs.get("shared", False), requested,
                kwargs.get("queued_by", granted), granted, until)  # fmt: skip


def test_exclusive_holds_in_turn_with_growing_tokens_pass():
    assert check_locks([hold("a", 1, 0, 1, 5), hold("b", 2, 2, 6, 8, queued_by=3)]) == []


def test_two_exclusive_holders_at_once_are_caught():
    (failure, *_) = check_locks([hold("a", 1, 0, 1, 5), hold("b", 2, 2, 3, 8)])
    assert "held it at once" in failure


def test_readers_may_share_but_not_with_a_writer():
    readers = [hold("a", 1, 0, 1, 5, shared=True), hold("b", 1, 0, 2, 6, shared=True)]
    assert check_locks(readers) == []
    assert check_locks([*readers, hold("w", 2, 0, 3, 4)]) != []


def test_a_grant_out_of_queue_order_is_caught():
    # a queued at 1, b asked at 2, yet b was granted first (smaller token).
    holds = [hold("a", 3, 0, 10, 12, queued_by=1), hold("b", 2, 2, 6, 8)]
    assert any("queued earlier" in f for f in check_locks(holds))


def test_a_token_that_does_not_grow_is_caught():
    holds = [hold("a", 5, 0, 1, 2), hold("b", 5, 3, 4, 5)]  # b asked after a's grant: its token must be larger
    assert any("does not grow" in f for f in check_locks(holds))


def test_a_barrier_that_releases_before_the_last_arrival_is_caught():
    together = [Arrival("a", "b", 0, 0, 3), Arrival("b", "b", 0, 2, 3)]
    assert check_barriers(together, parties=2) == []
    early = [Arrival("a", "b", 0, 0, 1), Arrival("b", "b", 0, 2, 3)]
    (failure,) = check_barriers(early, parties=2)
    assert "before b arrived" in failure
    assert check_barriers(together[:1], parties=2) == ["b generation 0 released 1 members, not 2"]


def test_the_recorder_keeps_a_failed_call_without_an_end():
    history = History(clock=iter(range(10)).__next__)
    assert history.record("a", "set", "k", "1", lambda: None) is None

    def killed() -> None:
        raise ConnectionError("server gone")

    with pytest.raises(ConnectionError):
        history.record("a", "add", "n", 1, killed)
    answered, lost = history.operations
    assert (answered.start, answered.end) == (0, 1) and answered.answered
    assert (lost.start, lost.end, lost.result) == (2, NEVER, None) and not lost.answered
