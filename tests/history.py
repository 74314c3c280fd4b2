"""Histories of coordination operations, recorded by the fault tests, and the checks run on them.

- The key-value store and the counters: linearizable per key (linearizability is local, so each key is
  checked alone). The search is Wing and Gong's: linearize, one at a time, an operation that no other
  pending operation finished before it started, and backtrack when the model cannot give the answer it
  got; Lowe's memo of (operations linearized, state) keeps it polynomial on the histories tests make.
- Locks: at most one exclusive holder at a time in real time, grants in the order requests queued, and
  fencing tokens that grow with real time.
- Barriers: no member is released before every member of its generation arrived.

An operation that never answered (its client or its server was killed, or it timed out) may or may not
have taken effect: it has no end and no result, and the search may place it anywhere after its start,
or leave it out.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
NEVER = math.inf  # the end of an operation that never answered


@dataclass(frozen=True)
class Operation:
    """One call on one key. action: set (argument: the value), get, add (the delta; the result is the new
    count), cas (argument: (expected, desired); the result: (swapped, value now)) or delete (the result:
    whether the key was there). Values are str; a missing key reads as None."""

    process: str
    action: str
    key: str
    argument: Any
    result: Any
    start: float
    end: float = NEVER

    @property
    def answered(self) -> bool:
        return self.end != NEVER


def apply(state: Any, op: Operation) -> tuple[bool, Any]:
    """The sequential model of one key: whether `op` could have answered what it did in `state`, and the
    state after it."""
    action, argument = op.action, op.argument
    if action == "set":
        return True, argument
    if action == "get":
        return (not op.answered or op.result == state), state
    if action == "add":
        count = int(state or 0) + argument
        return (not op.answered or op.result == count), count
    if action == "cas":
        expected, desired = argument
        after = desired if state == expected else state
        return (not op.answered or op.result == (state == expected, after)), after
    if action == "delete":
        return (not op.answered or op.result == (state is not None)), None
    raise ValueError(f"unknown action {action!r}")


def linearization_failure(ops: list[Operation], initial: Any = None) -> str | None:
    """None if the operations on one key are linearizable from `initial`; else what could not be placed."""
    ops = sorted(ops, key=lambda o: o.start)
    must = sum(1 << i for i, op in enumerate(ops) if op.answered)  # every answered op is placed
    seen: set[tuple[int, Any]] = set()
    deepest = 0  # the most operations any search path placed, for the message
    stack: list[tuple[int, Any]] = [(0, initial)]
    while stack:
        placed, state = stack.pop()
        if placed & must == must:
            return None
        if (placed, state) in seen:
            continue
        seen.add((placed, state))
        deepest = max(deepest, placed.bit_count())
        pending = [i for i in range(len(ops)) if not placed >> i & 1]
        first_end = min(ops[i].end for i in pending)
        for i in pending:
            if ops[i].start > first_end:
                break  # sorted by start: no later op can go before the one that ended first
            fits, after = apply(state, ops[i])
            if fits:
                stack.append((placed | 1 << i, after))
    unplaced = [op for op in ops if op.answered][:5]
    return f"key {ops[0].key!r}: no order of its {len(ops)} operations explains them (at most {deepest} placed); " + (
        "; ".join(
            f"{o.process} {o.action}({o.argument!r}) -> {o.result!r} [{o.start:.3f}, {o.end:.3f}]" for o in unplaced
        )
    )


def check_linearizable(ops: Iterable[Operation], initial: dict[str, Any] | None = None) -> list[str]:
    """Every key's failure (none: the history is linearizable)."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    failures = [linearization_failure(key_ops, (initial or {}).get(key)) for key, key_ops in by_key.items()]
    return [f for f in failures if f]


@dataclass(frozen=True)
class Hold:
    """A lock held: asked for at `requested`, known to be queued by `queued_by` (a status that listed the
    request, or else its grant), granted when acquire returned, held at least until `until` (when release
    was called, or the last moment its holder knew it held)."""

    process: str
    lock: str
    token: int
    shared: bool
    requested: float
    queued_by: float
    granted: float
    until: float


def check_locks(holds: Iterable[Hold]) -> list[str]:
    """Exclusive holds never overlap another hold of their lock; a request queued before another was made
    is granted first; a grant made before another was asked for has the smaller fencing token."""
    holds = list(holds)
    failures = []
    for a in holds:
        for b in holds:
            if a is b:
                continue
            same_lock, either_exclusive = a.lock == b.lock, not (a.shared and b.shared)
            if (
                same_lock
                and either_exclusive
                and a.granted < b.until
                and b.granted < a.until
                and a.granted <= b.granted
            ):
                failures.append(f"{a.lock}: {a.process} and {b.process} held it at once ({b.granted:.3f}..)")
            if same_lock and either_exclusive and a.queued_by < b.requested and b.token < a.token:
                failures.append(
                    f"{a.lock}: {b.process} (token {b.token}) was granted before {a.process} queued earlier"
                )
            if same_lock and a.granted < b.requested and b.token <= a.token and either_exclusive:
                failures.append(f"{a.lock}: token {b.token} of {b.process} does not grow past {a.token} of {a.process}")
    return failures


@dataclass(frozen=True)
class Arrival:
    """One member's wait at a barrier: called at start, released at end, in that generation."""

    process: str
    barrier: str
    generation: int
    start: float
    end: float


def check_barriers(arrivals: Iterable[Arrival], parties: int) -> list[str]:
    """Each generation released exactly `parties` members, none before the last of them arrived."""
    by_round: dict[tuple[str, int], list[Arrival]] = defaultdict(list)
    for arrival in arrivals:
        by_round[arrival.barrier, arrival.generation].append(arrival)
    failures = []
    for (name, generation), members in sorted(by_round.items()):
        if len(members) != parties:
            failures.append(f"{name} generation {generation} released {len(members)} members, not {parties}")
        last_in = max(members, key=lambda a: a.start)
        first_out = min(members, key=lambda a: a.end)
        if first_out.end < last_in.start:
            failures.append(
                f"{name} generation {generation}: {first_out.process} was released at {first_out.end:.3f}, "
                f"before {last_in.process} arrived at {last_in.start:.3f}"
            )
    return failures


class History:
    """A thread-safe record of key-value operations, each timed around the call that made it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.operations: list[Operation] = []
        self._lock = threading.Lock()

    def record(self, process: str, action: str, key: str, argument: Any, call: Callable[[], T]) -> T:
        """Run `call`; its answer, normalised by the caller, is the result. A call that raised may have
        taken effect: it goes in without an end, and the error goes on up."""
        start = self.clock()
        try:
            result = call()
        except BaseException:
            self._add(Operation(process, action, key, argument, None, start))
            raise
        self._add(Operation(process, action, key, argument, result, start, self.clock()))
        return result

    def _add(self, op: Operation) -> None:
        with self._lock:
            self.operations.append(op)
