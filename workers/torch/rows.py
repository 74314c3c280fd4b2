"""The rows of a worker's embedding tables: pulled for each forward, their gradients pushed once a step.

One RowExchange per process serves every nd.Embedding and nd.EmbeddingBag.
A step of the tables:

1. forward: each table pulls the unique rows of its batch (or takes those
   nd.prefetch pulled earlier, one call per shard for all tables). Under BSP
   the pull waits until the servers applied every earlier step of the table;
   under SSP until the slowest worker is within the staleness bound.
2. backward: each table's gradient arrives as one row per unique id
   (duplicates in the batch already summed by autograd). Once every table
   that ran a training forward in this step has its gradient, they are pushed
   together, one call per shard, on a background thread, so the push overlaps
   the rest of backward and the dense gradients' exchange. In a group
   (hierarchical mode) the rows are first gathered to the group leader, which
   pushes the group's sum scaled as the dense path scales its mean, so the
   servers' average is the mean over all workers.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from nanodist.client import ParameterServerClient, SparseGradient, Values
from nanodist.client.tables import Table, find
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.workers.job import Job


@dataclass(frozen=True)
class RowGradient:
    ids: np.ndarray  # unique rows
    values: np.ndarray  # [len(ids), columns], float32


class RowExchange:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.client: ParameterServerClient = job.reader()
        self.mode = job.config.mode
        self.step = 0  # steps of the tables pushed so far
        self.tables: dict[str, Table] = {}
        self._used: set[str] = set()  # tables that ran a training forward in this step
        self._grads: dict[str, RowGradient] = {}
        self._lock = threading.Lock()
        self._pusher = ThreadPoolExecutor(1, thread_name_prefix="nanodist-rows")
        self._last_push: Future[Future[None] | None] | None = None
        self._prefetched: dict[str, tuple[np.ndarray, Future[Values]]] = {}
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="nanodist-prefetch")

    # --- tables ----------------------------------------------------------

    def declare(
        self,
        name: str,
        rows: int,
        columns: int,
        optimizer: ps.Optimizer | None,
        initializer: ps.RowInitializer | None,
    ) -> Table:
        """Create the table on the servers (first writer wins) and check that it is the one declared."""
        if name in self.tables:
            raise ValueError(f"table {name!r} is declared twice in this process; give each table its own name")
        self.client.init_table(name, rows, columns, optimizer=optimizer, initializer=initializer)
        table = find(name, self.client.list_keys(), len(self.client.shards))
        if table is None or (table.rows, table.columns) != (rows, columns):
            found = "no table" if table is None else f"{table.rows} x {table.columns}"
            raise ValueError(f"table {name!r}: this worker declares {rows} x {columns}, the servers hold {found}")
        self.tables[name] = table
        return table

    # --- forward ---------------------------------------------------------

    def rows(self, name: str, ids: np.ndarray, training: bool) -> np.ndarray:
        """The current values of unique `ids` of table `name` ([len(ids), columns], writable)."""
        self.tables[name].check_ids(ids)  # before anything is sent
        self._wait_for_push()
        hit = self._prefetched.pop(name, None)
        if hit is not None and np.array_equal(hit[0], ids):
            values = hit[1].result()[name]
        else:
            values = self._pull({name: ids}, self.step)[name]
        if training:
            with self._lock:
                self._used.add(name)
        return values

    def prefetch(self, ids: dict[str, np.ndarray]) -> None:
        """Start pulling the rows the next step's forward needs, for all tables in one call per shard.

        The servers answer once the current step is applied (BSP), so the
        request's round trip overlaps the current step instead of following it.
        """
        for name, wanted in ids.items():
            self.tables[name].check_ids(wanted)
        with self._lock:
            target = self.step + (1 if self._used else 0)
        pending = self._prefetcher.submit(self._pull, ids, target)
        for name, wanted in ids.items():
            self._prefetched[name] = (wanted, pending)

    def _pull(self, ids: dict[str, np.ndarray], step: int) -> Values:
        min_version = step if self.mode == "bsp" else 0
        clock = step if self.mode == "ssp" else 0
        return self.job.watching_peers(
            lambda slice_ms: self.client.pull_rows(ids, min_version=min_version, clock=clock, timeout_ms=slice_ms)
        )

    # --- backward --------------------------------------------------------

    def deposit(self, name: str, gradient: RowGradient) -> None:
        """A table's row gradients of this step; the last table's starts the push of all of them."""
        with self._lock:
            if name not in self._used:
                raise RuntimeError(f"table {name!r}: a backward with no training forward before it in this step")
            if name in self._grads:
                raise RuntimeError(
                    f"table {name!r}: two backward passes in one step; step the optimizer in between, or "
                    "run one forward per table per step"
                )
            self._grads[name] = gradient
            if len(self._grads) == len(self._used):
                self._start_push()

    def _start_push(self) -> None:
        """Called under the lock: hand this step's rows to the group (in order with every other
        collective of this rank) and then to the servers."""
        grads = dict(sorted(self._grads.items()))
        step = self.step
        self.step += 1
        self._used.clear()
        self._grads = {}
        if self.job.config.flat or self.job.comm.size == 1:
            done: Future[Future[None] | None] = Future()
            done.set_result(self._pusher.submit(self._push, step, grads))
            self._last_push = done
        else:
            self._last_push = self.job.collectives().submit(self._gather_then_push, step, grads)

    def _gather_then_push(self, step: int, grads: dict[str, RowGradient]) -> Future[None] | None:
        gathered = gather_rows(self.job, grads)
        if not self.job.is_leader:
            return None
        scale = self.job.push_scale / self.job.comm.size  # the group's mean, weighted as the dense path's
        scaled = {name: RowGradient(g.ids, g.values * np.float32(scale)) for name, g in gathered.items()}
        return self._pusher.submit(self._push, step, scaled)

    def _push(self, step: int, grads: dict[str, RowGradient]) -> None:
        self.client.push_rows({name: SparseGradient(g.ids, g.values) for name, g in grads.items()}, step=step)

    def _wait_for_push(self) -> None:
        """Surface a failed push before the next pull waits for the step it never completed."""
        if self._last_push is not None:
            inner = self._last_push.result()
            if inner is not None:
                inner.result()

    def in_flight(self) -> bool:
        return True  # synchronize() is cheap when nothing is pending

    def synchronize(self) -> None:
        """Push a step whose tables did not all get a gradient, then wait until the push is done."""
        with self._lock:
            if self._used:
                for name in self._used - set(self._grads):
                    columns = self.tables[name].columns
                    self._grads[name] = RowGradient(np.empty(0, np.int64), np.empty((0, columns), np.float32))
                self._start_push()
        self._wait_for_push()

    def close(self) -> None:
        """Finish the push in flight (peers wait for it under BSP), then stop the threads."""
        try:
            self._wait_for_push()
        finally:
            self._pusher.shutdown(wait=True)
        self._prefetcher.shutdown(wait=True)


def gather_rows(job: Job, grads: dict[str, RowGradient]) -> dict[str, RowGradient]:
    """Every rank's rows of every table, concatenated (rows repeat across ranks; the servers add them up).

    Three allgathers whatever the number of tables: the row counts, the ids
    and the values, each padded to the largest rank's.
    """
    comm = job.comm
    names = list(grads)
    counts = comm.allgather(np.array([len(grads[n].ids) for n in names], dtype=np.int64))  # [ranks, tables]
    widths = np.array([grads[n].values.shape[1] for n in names], dtype=np.int64)
    ids = np.concatenate([grads[n].ids for n in names]) if names else np.empty(0, np.int64)
    values = np.concatenate([grads[n].values.reshape(-1) for n in names]) if names else np.empty(0, np.float32)
    longest = int(counts.sum(axis=1).max())
    widest = int((counts * widths).sum(axis=1).max())
    all_ids = comm.allgather(np.pad(ids, (0, longest - len(ids))))
    all_values = comm.allgather(np.pad(values.astype(np.float32), (0, widest - len(values))))
    out: dict[str, RowGradient] = {}
    for t, name in enumerate(names):
        parts_ids, parts_values = [], []
        for rank in range(comm.size):
            first = int(counts[rank, :t].sum())
            start = int((counts[rank, :t] * widths[:t]).sum())
            n = int(counts[rank, t])
            parts_ids.append(all_ids[rank, first : first + n])
            parts_values.append(all_values[rank, start : start + n * widths[t]].reshape(n, widths[t]))
        out[name] = RowGradient(np.concatenate(parts_ids), np.concatenate(parts_values))
    return out
