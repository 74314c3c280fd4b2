"""The parameter store: keys, versions, optimizers and the consistency rules.

All methods are synchronous and run on the server's event loop, so each push
is applied atomically with respect to every other call without locks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from nanodist.services.common.errors import ConfigurationError, exhausted, failed_precondition, invalid, not_found
from nanodist.services.parameter_server.optimizers import CHUNK_ELEMENTS, Optimizer, OptimizerConfig
from nanodist.services.parameter_server.row_table import RowTable, TableShape
from nanodist.services.parameter_server.step_sums import narrowed, no_rows, step_total, summed_rows
from nanodist.wire.codec import NOT_ELASTIC, Entry, Membership

MAX_PENDING_STEPS = 64  # BSP steps of one key that may wait for pushes at once; each holds a full-size sum


def all_finite(array: np.ndarray) -> bool:
    """Whether `array` holds no NaN or Inf, using scratch memory of CHUNK_ELEMENTS booleans at most.

    np.isfinite(array).all() would allocate a boolean temporary the size of
    the gradient. A reduction to one number (a sum, a dot product) needs none,
    but a sum of large finite float16/float32 values overflows to Inf and
    would refuse a valid gradient. So the check runs isfinite over bounded
    slices into one small buffer: exact, and as fast as the full-size version.
    """
    if array.dtype.kind in "biu":  # booleans and integers hold no NaN or Inf
        return True
    flat = array.reshape(-1)  # a view of the contiguous arrays the server decodes (other layouts copy)
    scratch = np.empty(min(flat.size, CHUNK_ELEMENTS), dtype=bool)
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        piece = flat[start : start + CHUNK_ELEMENTS]
        found = scratch[: piece.size]
        np.isfinite(piece, out=found)
        if not found.all():
            return False
    return True


@dataclass(frozen=True)
class Limits:
    max_keys: int = 1_000_000
    max_bytes: int = 16 << 30  # values plus optimizer state
    reject_nonfinite: bool = True


class Mode(StrEnum):
    BSP = "bsp"  # average the pushes of all workers for a step, then apply once
    ASP = "asp"  # apply every push at once
    SSP = "ssp"  # apply at once; pulls wait for the slowest worker within a staleness bound


@dataclass
class Pending:
    """BSP accumulation of one key's gradients for one step."""

    total: np.ndarray
    workers: set[int] = field(default_factory=set)
    touched: np.ndarray | None = None  # sparse pushes: which rows received gradient
    dense: bool = False  # some push was dense: apply to the whole value
    rows: np.ndarray | None = None  # tables: the rows of `total`, every push's appended (a table is never summed whole)


@dataclass
class Slot:
    value: np.ndarray  # a table's is empty: its rows live in `table`
    optimizer: Optimizer
    version: int = 0
    applied_step: int = -1  # BSP: last step whose mean was applied
    pending: dict[int, Pending] = field(default_factory=dict)
    # Elastic jobs: the newest generation that pushed this key, and its pushers (0: --num-workers).
    generation: int = 0
    pushers: int = 0
    spare: list[np.ndarray] = field(default_factory=list)  # PushStream assembly buffers, reused
    spare_total: np.ndarray | None = None  # BSP: the last step's accumulator, reused by the next
    table: RowTable | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.table.shape.rows, self.table.shape.columns) if self.table else self.value.shape

    @property
    def dtype(self) -> np.dtype:
        return self.table.shape.dtype if self.table else self.value.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of values held (a table: the rows that exist)."""
        return (
            self.table.held * self.table.shape.columns * self.table.shape.dtype.itemsize
            if self.table
            else self.value.nbytes
        )

    @property
    def held_bytes(self) -> int:
        """Bytes of values and optimizer state, as --max-bytes counts them."""
        return (
            self.table.held * self.table.row_bytes
            if self.table
            else self.value.nbytes * (1 + len(self.optimizer.states))
        )


@dataclass
class PushResult:
    versions: list[int]
    applied: bool


class Store:
    def __init__(
        self,
        mode: Mode = Mode.ASP,
        num_workers: int = 1,
        staleness: int = 0,
        dedup_window: int = 65536,
        limits: Limits | None = None,
    ) -> None:
        # The names are the flags' (`nanodist serve ps`), which is where these usually come from.
        if num_workers < 1:
            raise ConfigurationError(f"--num-workers must be >= 1, got {num_workers}")
        if staleness < 0:
            raise ConfigurationError(f"--staleness must be >= 0, got {staleness}")
        if dedup_window < 0:
            raise ConfigurationError(f"--dedup-window must be >= 0, got {dedup_window}")
        self.limits = limits or Limits()
        self.bytes_held = 0
        self.mode = mode
        self.num_workers = num_workers
        self.staleness = staleness
        self.slots: dict[str, Slot] = {}
        self.clocks: dict[int, int] = {}
        # SSP: the newest generation pushed and its pushers, whose clocks the slowest is taken from.
        self.generation = 0
        self.pushers = 0
        self.pushes_applied = 0
        self.pushes_deduplicated = 0
        self.fencing_high = 0
        self._dedup_window = dedup_window
        self._seen: OrderedDict[str, bytes] = OrderedDict()

    # --- keys -----------------------------------------------------------

    def init(self, key: str, value: np.ndarray | TableShape, optimizer: OptimizerConfig) -> tuple[bool, int]:
        """Create `key` (a value, or a table of lazily created rows) unless it exists; return (created,
        version). First writer wins."""
        slot = self.slots.get(key)
        if slot is not None:
            return False, slot.version
        if len(self.slots) >= self.limits.max_keys:
            raise exhausted(f"{key!r}: the server holds {len(self.slots)} keys, its limit (--max-keys)")
        if isinstance(value, TableShape):
            table = RowTable(value, optimizer)
            self.slots[key] = Slot(np.empty((0, value.columns), value.dtype), table.optimizer, table=table)
            return True, 0
        needed = value.nbytes * (1 + optimizer.state_count)
        if self.bytes_held + needed > self.limits.max_bytes:
            raise exhausted(
                f"{key!r}: {needed} more bytes (value and optimizer state) would pass the "
                f"{self.limits.max_bytes}-byte limit (--max-bytes); {self.bytes_held} are held"
            )
        owned = np.array(value, dtype=value.dtype, order="C", copy=True)
        self.slots[key] = Slot(value=owned, optimizer=Optimizer(optimizer, owned))
        self.bytes_held += needed
        return True, 0

    def adopt(self, key: str, slot: Slot) -> None:
        """Take a restored slot as it is (checkpoint restore)."""
        self.slots[key] = slot
        self.bytes_held += slot.held_bytes

    def slot(self, key: str, path: str) -> Slot:
        slot = self.slots.get(key)
        if slot is None:
            raise not_found(f"{path}: key {key!r} does not exist; Init it first")
        return slot

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots.values())

    # --- dedup ----------------------------------------------------------

    def replay(self, request_id: str) -> bytes | None:
        """The stored response of an already-applied request, if any."""
        response = self._seen.get(request_id)
        if response is not None:
            self.pushes_deduplicated += 1
        return response

    def recent_requests(self) -> list[tuple[str, bytes]]:
        """The dedup window, oldest first (checkpointed so that retries across a restart stay exactly-once)."""
        return list(self._seen.items())

    def remember(self, request_id: str, response: bytes) -> None:
        self._seen[request_id] = response
        if len(self._seen) > self._dedup_window:
            self._seen.popitem(last=False)

    # --- push -----------------------------------------------------------

    def check_push(
        self, entries: list[Entry], worker_id: int, step: int, fencing_token: int, membership: Membership = NOT_ELASTIC
    ) -> list[Slot]:
        """Validate a whole push before any of it is applied, so a bad entry changes nothing."""
        if membership.pushers < 0:
            raise invalid(f"pushers: must be >= 0, got {membership.pushers}")
        pushers = membership.pushers or self.num_workers
        if self.mode is not Mode.ASP and not 0 <= worker_id < pushers:
            among = (
                f"{pushers} pushers in generation {membership.generation}"
                if membership.pushers
                else f"num_workers={self.num_workers}"
            )
            raise invalid(f"worker_id: {worker_id} is outside [0, {pushers}) for {self.mode.value} with {among}")
        if step < 0:
            raise invalid(f"step: must be >= 0, got {step}")
        if fencing_token and fencing_token < self.fencing_high:
            raise failed_precondition(
                f"fencing_token: {fencing_token} is older than {self.fencing_high}; the writer lost its lock"
            )
        if not entries:
            raise invalid("entries: a push needs at least one gradient")
        slots, seen = [], set()
        for i, entry in enumerate(entries):
            path = f"entries[{i}]"
            if entry.key in seen:
                raise invalid(f"{path}.key: {entry.key!r} appears twice in one push")
            seen.add(entry.key)
            slot = self.slot(entry.key, f"{path}.key")
            self._check_gradient(slot, entry, path)
            if self.mode is not Mode.ASP and membership.generation < slot.generation:
                raise failed_precondition(
                    f"generation: {membership.generation} is over; {entry.key!r} is pushed by generation "
                    f"{slot.generation}, which went on without worker {worker_id}"
                )
            newer = membership.generation > slot.generation  # its steps collecting pushes will be dropped
            if self.mode is Mode.BSP and step <= slot.applied_step and not _pushed_again(membership, slot):
                raise failed_precondition(
                    f"step: step {step} of {entry.key!r} was already applied (last applied step {slot.applied_step})"
                )
            pending = slot.pending.get(step) if self.mode is Mode.BSP and not newer else None
            if self.mode is Mode.BSP and pending is None and not newer and len(slot.pending) >= MAX_PENDING_STEPS:
                raise exhausted(
                    f"step: {len(slot.pending)} steps of {entry.key!r} already wait for pushes "
                    f"(limit {MAX_PENDING_STEPS}); step {step} runs too far ahead"
                )
            if pending is not None and worker_id in pending.workers:
                raise failed_precondition(
                    f"worker {worker_id} already pushed step {step} of {entry.key!r} with another request_id"
                )
            slots.append(slot)
        self._check_growth(slots, entries)
        return slots

    def _check_growth(self, slots: list[Slot], entries: list[Entry]) -> None:
        """Refuse a push whose new table rows would pass --max-bytes, naming the table."""
        growth = 0
        for slot, entry in zip(slots, entries, strict=True):
            if slot.table is None or entry.rows is None:
                continue
            new = slot.table.new_rows(np.unique(entry.rows))
            growth += new * slot.table.row_bytes
            if new and self.bytes_held + growth > self.limits.max_bytes:
                raise exhausted(
                    f"table {entry.key!r}: {new} new rows ({new * slot.table.row_bytes} bytes with optimizer state) "
                    f"would pass the {self.limits.max_bytes}-byte limit (--max-bytes); {self.bytes_held} are held"
                )

    def _check_gradient(self, slot: Slot, entry: Entry, path: str) -> None:
        shape = slot.shape
        if entry.rows is not None:
            grad = entry.values
            assert grad is not None
            if len(shape) != 2:
                raise invalid(f"{path}.sparse: key {entry.key!r} has shape {list(shape)}; sparse rows need a 2-D key")
            if grad.shape[1] != shape[1]:
                raise invalid(f"{path}.sparse.values: {grad.shape[1]} columns, key has {shape[1]}")
            if len(entry.rows) and (entry.rows.min() < 0 or entry.rows.max() >= shape[0]):
                raise invalid(f"{path}.sparse.rows: indices must be in [0, {shape[0]})")
        elif entry.dense is not None:
            grad = entry.dense
            if slot.table is not None:
                raise invalid(f"{path}.dense: {entry.key!r} is a table of lazily created rows; push sparse rows")
            if grad.shape != shape:
                raise invalid(f"{path}.dense.shape: {list(grad.shape)} differs from the key's {list(shape)}")
        else:
            raise invalid(f"{path}: no gradient (set dense or sparse)")
        if grad.dtype != slot.dtype:
            raise invalid(f"{path}: gradient dtype {grad.dtype.name} differs from the key's {slot.dtype.name}")
        if self.limits.reject_nonfinite and not all_finite(grad):
            # One NaN would spread through the optimizer into every later pull.
            raise invalid(f"{path}: the gradient of {entry.key!r} holds NaN or Inf (--allow-nonfinite accepts it)")

    def push(
        self,
        entries: list[Entry],
        worker_id: int,
        step: int,
        fencing_token: int = 0,
        membership: Membership = NOT_ELASTIC,
    ) -> PushResult:
        """Validate, then apply (ASP/SSP) or accumulate (BSP) every entry."""
        slots = self.check_push(entries, worker_id, step, fencing_token, membership)
        self.fencing_high = max(self.fencing_high, fencing_token)
        if self.mode is not Mode.ASP:
            self._follow(slots, membership)
            self.clocks[worker_id] = max(self.clocks.get(worker_id, 0), step + 1)
        applied = True
        for slot, entry in zip(slots, entries, strict=True):
            if self.mode is Mode.BSP and step <= slot.applied_step:
                continue  # a completed step pushed again by a new generation (check_push let only that through)
            if self.mode is Mode.BSP:
                applied = self._accumulate(slot, entry, worker_id, step) and applied
            else:
                self._apply(slot, entry, 1.0)
        if applied:
            self.pushes_applied += 1
        return PushResult([s.version for s in slots], applied)

    def _follow(self, slots: list[Slot], membership: Membership) -> None:
        """Elastic jobs: a key pushed by a newer generation drops the steps still collecting pushes (its
        members push them again, so a step that lost a member mid-way completes with the survivors'
        gradients, averaged over the survivors); SSP forgets the clocks of the departed."""
        for slot in slots:
            if membership.generation > slot.generation:
                slot.pending.clear()
                slot.generation, slot.pushers = membership.generation, membership.pushers
        if membership.generation > self.generation:
            self.generation, self.pushers = membership.generation, membership.pushers
            self.clocks.clear()

    def _apply(self, slot: Slot, entry: Entry, scale: float) -> None:
        if entry.rows is not None:
            assert entry.values is not None  # check_push refused sparse rows without values
            self._apply_rows(slot, *summed_rows(entry.rows, entry.values), scale)
        else:
            assert entry.dense is not None  # check_push refused an entry with no gradient
            slot.optimizer.apply_dense(slot.value, entry.dense, scale)
        slot.version += 1

    def _apply_rows(self, slot: Slot, rows: np.ndarray, grad: np.ndarray, scale: float) -> None:
        """Update unique `rows`; a table creates the rows it lacks (and holds their bytes from now on)."""
        if slot.table is None:
            slot.optimizer.apply_rows(slot.value, rows, grad, scale)
            return
        before = slot.held_bytes
        slot.table.update(rows, grad, scale)
        self.bytes_held += slot.held_bytes - before

    def _accumulate(self, slot: Slot, entry: Entry, worker_id: int, step: int) -> bool:
        pending = slot.pending.get(step)
        first_dense = pending is None and slot.table is None and entry.rows is None
        if pending is None:
            pending = slot.pending[step] = Pending(total=self._step_total(slot, zeroed=not first_dense))
        if slot.table is not None:
            assert entry.rows is not None and entry.values is not None  # check_push refused dense table pushes
            pending.rows = entry.rows if pending.rows is None else np.concatenate([pending.rows, entry.rows])
            pending.total = np.concatenate([pending.total, entry.values])
        elif entry.rows is not None:
            assert entry.values is not None  # check_push refused sparse rows without values
            np.add.at(pending.total, entry.rows, entry.values)
            if pending.touched is None:
                pending.touched = np.zeros(slot.value.shape[0], dtype=bool)
            pending.touched[entry.rows] = True
        else:
            assert entry.dense is not None  # check_push refused an entry with no gradient
            if first_dense:
                np.copyto(pending.total, entry.dense)  # the step's first push: no zeroing pass
            else:
                np.add(pending.total, entry.dense, out=pending.total)
            pending.dense = True
        pending.workers.add(worker_id)
        pushers = slot.pushers or self.num_workers
        if len(pending.workers) < pushers:
            return False
        del slot.pending[step]
        scale = 1.0 / pushers
        if slot.table is not None:
            self._apply_rows(
                slot, *summed_rows(no_rows() if pending.rows is None else pending.rows, pending.total), scale
            )
        elif not pending.dense and pending.touched is not None:
            rows = np.flatnonzero(pending.touched)
            slot.optimizer.apply_rows(slot.value, rows, pending.total[rows].astype(slot.value.dtype), scale)
        elif pending.total.dtype != slot.value.dtype:
            slot.optimizer.apply_dense(slot.value, narrowed(slot.value, slot.spare, pending.total, scale), 1.0)
        else:
            slot.optimizer.apply_dense(slot.value, pending.total, scale)
        if slot.table is None:
            slot.spare_total = pending.total
        slot.version += 1
        slot.applied_step = step
        return True

    @staticmethod
    def _step_total(slot: Slot, zeroed: bool) -> np.ndarray:
        if slot.table is not None:
            return np.zeros_like(slot.value)  # a table's rows are appended, not summed in place
        last, slot.spare_total = slot.spare_total, None
        return step_total(slot.value, last, zeroed)

    # --- pull -----------------------------------------------------------

    def ready(self, slots: list[Slot], min_version: int, clock: int) -> bool:
        """Whether a pull may return now (BSP version, SSP staleness)."""
        if any(slot.version < min_version for slot in slots):
            return False
        if self.mode is Mode.SSP and clock:
            return self.slowest_clock() >= clock - self.staleness
        return True

    def slowest_clock(self) -> int:
        return min(self.clocks.get(w, 0) for w in range(self.pushers or self.num_workers))


def _pushed_again(membership: Membership, slot: Slot) -> bool:
    """Elastic: the survivors of a loss push again the step they were in; where the servers had completed
    it (a leader may die between two shards), the push changes nothing, so the step stays applied once."""
    return membership.generation > 0 and membership.generation >= slot.generation
