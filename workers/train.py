"""`nanodist worker`: data-parallel training against the parameter server.

Hierarchical mode (the default): the workers of a group allreduce their
gradients (MEAN), the group leader pushes the group's gradient to the
parameter-server shards and pulls the new parameters, then broadcasts them to
its group. Flat mode: every worker pushes and pulls on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np

from nanodist.client import (
    BarrierBroken,
    BarrierClient,
    DeadlineExceeded,
    KVStore,
    LockClient,
    NanodistError,
    ParameterServerClient,
    Values,
    sgd,
)
from nanodist.settings import env_default, env_optional
from nanodist.workers.comm import CommError, Communicator, ReduceOp
from nanodist.workers.data import ShardSampler, load_digits
from nanodist.workers.models import MLP
from nanodist.workers.report import plot_training, write_metrics
from nanodist.workers.timing import PhaseTimer


def say(line: str) -> None:
    """One write per line, so that mpiexec never splices two ranks' lines together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


PULL_SLICE_MS = 500  # how often a waiting pull looks for a broken barrier


class ConfigError(ValueError):
    """The worker was started with settings that cannot work; the message says which."""


@dataclass
class TrainConfig:
    ps: list[str]
    barrier: str
    lock: str
    run_id: str
    runs_dir: str = "runs"
    backend: str = "single"
    group_id: int = 0
    num_groups: int = 1
    group_size: int = 1
    flat: bool = False
    mode: str = "bsp"
    staleness: int = 0
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 0.3
    hidden: tuple[int, ...] = (64,)
    seed: int = 0
    max_steps: int = 0
    slow_ms: int = 0
    join_window: float = 5.0
    dump_params: str = ""
    timeout: float = 60.0
    pipeline_stages: int = 0  # > 1: each group is one replica of a pipeline with this many stages
    micro_batches: int = 4
    schedule: str = "1f1b"
    pipeline_split: tuple[int, ...] = ()  # layers per stage; empty: balanced by parameter count

    def validate(self) -> None:
        if self.backend not in ("mpi", "tcp", "single"):
            raise ConfigError(f"--backend {self.backend!r} is unknown; choose mpi, tcp or single")
        if self.mode not in ("bsp", "asp", "ssp"):
            raise ConfigError(f"--mode {self.mode!r} is unknown; choose bsp, asp or ssp")
        if not 0 <= self.group_id < self.num_groups:
            raise ConfigError(f"--group-id {self.group_id} is outside [0, {self.num_groups})")
        if self.group_size < 0 or self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ConfigError("--epochs and --batch-size must be >= 1, --group-size >= 0 and --lr > 0")
        if self.group_size == 0 and self.backend != "tcp":
            raise ConfigError("--group-size 0 (join as many as arrive) needs --backend tcp")
        if not self.ps:
            raise ConfigError("--ps needs at least one parameter-server address")
        if self.pipeline_stages > 1:
            layers = len(self.hidden) + 1
            if self.pipeline_stages > layers:
                raise ConfigError(
                    f"--pipeline-stages {self.pipeline_stages} needs at least that many layers; "
                    f"--hidden {','.join(map(str, self.hidden))} gives {layers}"
                )
            if self.group_size != self.pipeline_stages or self.flat or self.mode != "bsp":
                raise ConfigError(
                    "--pipeline-stages K runs each group as one pipeline replica: it needs --group-size K, "
                    "--mode bsp and no --flat"
                )
            if self.micro_batches < 1 or self.batch_size % self.micro_batches:
                raise ConfigError(
                    f"--batch-size {self.batch_size} must split into --micro-batches {self.micro_batches} equal parts"
                )


@dataclass
class _State:
    """What the evaluator records while training."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    clocks: list[tuple[int, int]] = field(default_factory=list)  # (own clock, slowest clock seen)


class FlatBuffer:
    """Parameters (or gradients) as views into one contiguous array, so a collective moves them in one call."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: np.dtype) -> None:
        sizes = {k: int(np.prod(s)) for k, s in shapes.items()}
        self.data = np.zeros(sum(sizes.values()), dtype=dtype)
        self.views: dict[str, np.ndarray] = {}
        offset = 0
        for key, shape in shapes.items():
            self.views[key] = self.data[offset : offset + sizes[key]].reshape(shape)
            offset += sizes[key]

    def load(self, values: dict[str, np.ndarray]) -> None:
        for key, view in self.views.items():
            np.copyto(view, values[key])


class Worker:
    def __init__(self, config: TrainConfig) -> None:
        config.validate()
        self.config = config
        self.timer = PhaseTimer()
        self.state = _State()
        self.kv = KVStore(config.lock, timeout=config.timeout)
        self.comm = self._join_group()
        sizes = self._group_sizes()
        self.world = sum(sizes)
        self.replicas = self.world  # workers that each train on their own batch
        self.rank = sum(sizes[: config.group_id]) + self.comm.rank
        # The servers average the pushes of the groups; scaling each group's mean by its share makes that
        # average the mean over all workers even when groups differ in size.
        self.push_scale = sizes[config.group_id] * config.num_groups / self.world
        self.is_leader = self.comm.rank == 0
        self.pushes = config.flat or self.is_leader
        self.name = f"rank {self.rank}"
        data = load_digits(seed=config.seed)
        self.data = data
        try:
            self.sampler = ShardSampler(len(data.y_train), self.rank, self.world, seed=config.seed)
            self.sampler.batches(0, config.batch_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.model = MLP((data.features, *config.hidden, data.classes))
        shapes = {k: v.shape for k, v in self.model.init(config.seed).items()}
        self.params = FlatBuffer(shapes, np.dtype(self.model.dtype))
        self.grads = FlatBuffer(shapes, np.dtype(self.model.dtype))
        self.ps = self._connect_ps() if self.pushes else None
        self.barrier = BarrierClient(
            config.barrier,
            f"{config.run_id}/rank-{self.rank}",
            session_ttl=5.0,
            barriers=[self._barrier_name],
            timeout=config.timeout,
        )

    @property
    def _barrier_name(self) -> str:
        return f"{self.config.run_id}/epoch"

    def _join_group(self) -> Communicator:
        c = self.config
        if c.backend == "tcp":
            group = f"{c.run_id}/group-{c.group_id}"
            rank, size = self._elastic_rank(group) if c.group_size == 0 else (None, c.group_size)
            comm = Communicator.from_env(
                "tcp", world_size=size, rank=rank, lock_address=c.lock, group=group, timeout=c.timeout
            )
        else:
            comm = Communicator.from_env(c.backend)
        if c.group_size and comm.size != c.group_size:
            comm.close()
            raise ConfigError(
                f"group-size mismatch: --group-size {c.group_size} but the {c.backend} group has {comm.size} ranks"
            )
        return comm

    def _elastic_rank(self, group: str) -> tuple[int, int]:
        """--group-size 0: members take ranks from a counter; rank 0 closes the group once no one
        has joined for --join-window seconds (as torchelastic's last call), then publishes its size."""
        c = self.config
        rank = self.kv.add(f"{group}/joined", 1) - 1
        size_key = f"{group}/size"
        if rank == 0:
            seen, stable_since = 1, time.monotonic()
            while time.monotonic() - stable_since < c.join_window:
                time.sleep(0.2)
                now = self.kv.add(f"{group}/joined", 0)
                if now != seen:
                    seen, stable_since = now, time.monotonic()
            self.kv.set(size_key, str(seen))
        self.kv.wait([size_key], timeout=c.timeout + c.join_window)
        size = int(self.kv.get(size_key))
        if rank >= size:
            raise ConfigError(f"joined group {group!r} as member {rank + 1} after it closed with {size} members")
        say(f"[{group}] member {rank} of {size}")
        return rank, size

    def _group_sizes(self) -> list[int]:
        """Every group leader publishes its size; everyone learns all sizes, hence global ranks and world size."""
        c = self.config
        if self.comm.rank == 0:
            self.kv.set(f"{c.run_id}/group-size/{c.group_id}", str(self.comm.size))
        keys = [f"{c.run_id}/group-size/{g}" for g in range(c.num_groups)]
        try:
            self.kv.wait(keys, timeout=c.timeout)
        except NanodistError as error:
            raise ConfigError(f"not every one of the {c.num_groups} groups showed up: {error.message}") from None
        return [int(self.kv.get(k)) for k in keys]

    def _connect_ps(self) -> ParameterServerClient:
        c = self.config
        worker_id = self.rank if c.flat else c.group_id
        client = ParameterServerClient(c.ps, worker_id=worker_id, timeout=c.timeout)
        try:
            client.wait_ready(timeout=min(10.0, c.timeout))
        except NanodistError as error:
            raise ConfigError(f"{error.message}; check --ps") from None
        return client

    # --- set-up ---------------------------------------------------------

    def initialise(self) -> None:
        """Rank 0 creates the keys (first writer wins); the others wait for them, then pull."""
        ready_key = f"{self.config.run_id}/initialized"
        if self.rank == 0:
            assert self.ps is not None
            self.ps.init(self.model.init(self.config.seed), sgd(self.config.learning_rate))
            self.kv.set(ready_key, "1")
        else:
            self.kv.wait([ready_key], timeout=self.config.timeout)
        if self.ps is not None:
            self.params.load(self.ps.pull(self.params.views))
        if not self.config.flat:
            self.comm.broadcast(self.params.data, root=0)

    # --- training -------------------------------------------------------

    def step(self, t: int, x: np.ndarray, y: np.ndarray) -> float:
        with self.timer("step"):
            return self._step(t, x, y)

    def _step(self, t: int, x: np.ndarray, y: np.ndarray) -> float:
        c = self.config
        with self.timer("compute"):
            loss, grads = self.model.loss_and_grads(self.params.views, x, y)
            self.grads.load(grads)
            if c.slow_ms:
                time.sleep(c.slow_ms / 1000)
        if not c.flat:
            with self.timer("allreduce"):
                self.comm.allreduce(self.grads.data, ReduceOp.MEAN)
                if self.push_scale != 1.0:
                    self.grads.data *= self.push_scale
        if self.ps is not None:
            with self.timer("push"):
                self.ps.push(self.grads.views, step=t)
            with self.timer("pull"):
                values = self._pull_watching_peers(t)
                self.params.load(values)
            self.state.clocks.append((t + 1, values.slowest_clock))
        if not c.flat:
            with self.timer("broadcast"):
                self.comm.broadcast(self.params.data, root=0)
        self.timer.steps += 1
        return loss

    def _pull_watching_peers(self, t: int) -> Values:
        """Pull, waiting for the step (BSP) or the slowest worker (SSP) in short slices.

        Between slices, look at the epoch barrier: a worker that died anywhere
        breaks it when its session lapses, so a wait for its push ends with
        BarrierBroken naming it rather than a silent timeout.
        """
        c = self.config
        assert self.ps is not None
        deadline = time.monotonic() + c.timeout
        while True:
            try:
                return self.ps.pull(
                    self.params.views,
                    min_version=t + 1 if c.mode == "bsp" else 0,
                    clock=t + 1 if c.mode == "ssp" else 0,
                    timeout_ms=PULL_SLICE_MS,
                )
            except DeadlineExceeded:
                (state,) = self.barrier.status(self._barrier_name)
                if state.broken_reason:
                    raise BarrierBroken(state.broken_reason, grpc.StatusCode.ABORTED, list(state.missing)) from None
                if time.monotonic() > deadline:
                    raise

    def abort(self, reason: str) -> None:
        """Break the epoch barrier so that the other groups stop at once, naming the cause."""
        try:
            self.barrier.abort(self._barrier_name, reason[:1000])
        except NanodistError:
            pass

    def train(self) -> None:
        c = self.config
        self.initialise()
        t = 0
        batches_per_epoch = len(self.sampler.batches(0, c.batch_size))
        for epoch in range(1, c.epochs + 1):
            began = time.perf_counter()
            losses = []
            progress = Progress(self.name, epoch, c.epochs, batches_per_epoch)
            for batch in self.sampler.batches(epoch, c.batch_size):
                losses.append(self.step(t, self.data.x_train[batch], self.data.y_train[batch]))
                t += 1
                progress.update(losses[-1], len(batch) * self.replicas)
                if c.max_steps and t >= c.max_steps:
                    break
            progress.close()
            with self.timer("wait"):
                self.barrier.wait(self._barrier_name, self.world, timeout=c.timeout)
            if self.rank == 0:
                self._evaluate(epoch, float(np.mean(losses)), time.perf_counter() - began)
            if c.max_steps and t >= c.max_steps:
                break
        self._finish()

    def _evaluate(self, epoch: int, train_loss: float, seconds: float) -> None:
        with (
            LockClient(self.config.lock, f"{self.config.run_id}/rank-0") as locks,
            locks.lock(f"{self.config.run_id}/eval", ttl=30) as held,
        ):
            test_loss, accuracy = self.model.evaluate(self.full_params(), self.data.x_test, self.data.y_test)
            record = {
                "epoch": epoch,
                "train_loss": round(train_loss, 6),
                "test_loss": round(test_loss, 6),
                "test_accuracy": round(accuracy, 6),
                "seconds": round(seconds, 3),
                "eval_fencing_token": held.fencing_token,
            }
        self.state.epochs.append(record)
        say(
            f"[{self.name}] epoch {epoch}: train loss {train_loss:.4f}, test loss {test_loss:.4f}, "
            f"test accuracy {accuracy:.4f}"
        )

    def _finish(self) -> None:
        c = self.config
        mine = {"timings": self.timings(), "clocks": self.state.clocks if self.pushes else []}
        self.kv.set(f"{c.run_id}/report/{self.rank}", json.dumps(mine))
        if c.dump_params and self.rank == 0:
            np.savez(c.dump_params, **{k.replace("/", "."): v for k, v in self.full_params().items()})
        if self.rank != 0:
            return
        keys = [f"{c.run_id}/report/{r}" for r in range(self.world)]
        self.kv.wait(keys, timeout=c.timeout)
        reports = {r: json.loads(self.kv.get(k)) for r, k in enumerate(keys)}
        run_dir = os.path.join(c.runs_dir, c.run_id)
        config = asdict(c)
        metrics = {
            "run_id": c.run_id,
            "config": config,
            "world_size": self.world,
            "epochs": self.state.epochs,
            "final_test_accuracy": self.state.epochs[-1]["test_accuracy"] if self.state.epochs else None,
            "timings": {
                "per_worker": {r: rep["timings"] for r, rep in reports.items()},
                "mean_ms_per_step": _mean_per_step([rep["timings"] for rep in reports.values()]),
            },
            "clocks": {r: rep["clocks"] for r, rep in reports.items() if rep["clocks"]},
        }
        path = write_metrics(run_dir, metrics)
        plot = plot_training(
            run_dir,
            self.state.epochs,
            f"nanodist {c.run_id}: {self.world} workers, {c.mode.upper()}, {self.layout()}",
        )
        say(f"[{self.name}] wrote {path} and {plot}")

    def full_params(self) -> dict[str, np.ndarray]:
        """The whole model, by layer name (for evaluation and --dump-params)."""
        return self.params.views

    def timings(self) -> dict[str, float]:
        return self.timer.summary()

    def layout(self) -> str:
        return "flat" if self.config.flat else "hierarchical"

    def close(self) -> None:
        self.barrier.close()
        self.kv.close()
        if self.ps is not None:
            self.ps.close()
        self.comm.close()


def _mean_per_step(timings: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in timings[0] if k.endswith("_ms_per_step")]
    return {k.removesuffix("_ms_per_step"): round(float(np.mean([t[k] for t in timings])), 4) for k in keys}


class Progress:
    """A tqdm bar on a terminal; plain log lines (about four per epoch) otherwise, as in CI and containers."""

    def __init__(self, name: str, epoch: int, epochs: int, total: int) -> None:
        self.name, self.epoch, self.epochs, self.total = name, epoch, epochs, total
        self.count, self.samples, self.began = 0, 0, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{name} epoch {epoch}/{epochs}", leave=False, unit="step")

    def update(self, loss: float, samples: int) -> None:
        self.count += 1
        self.samples += samples
        rate = self.samples / max(1e-9, time.perf_counter() - self.began)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:.0f}")
            self.bar.update(1)
        elif self.count == self.total or self.count % max(1, self.total // 4) == 0:
            say(
                f"[{self.name}] epoch {self.epoch}/{self.epochs} step {self.count}/{self.total} "
                f"loss {loss:.4f} {rate:.0f} samples/s"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = env_default
    parser.add_argument(
        "--ps",
        default=env("ps", "127.0.0.1:50051"),
        help="comma-separated parameter-server shard addresses (env NANODIST_PS)",
    )
    parser.add_argument(
        "--barrier",
        default=env("barrier_address", "127.0.0.1:50061"),
        help="barrier service address (env NANODIST_BARRIER_ADDRESS)",
    )
    parser.add_argument(
        "--lock",
        default=env("lock_address", "127.0.0.1:50071"),
        help="lock service address (env NANODIST_LOCK_ADDRESS)",
    )
    parser.add_argument(
        "--run-id",
        default=env_optional("run_id"),
        required=env_optional("run_id") is None,
        help="names this run's keys, barriers and output folder; fresh per run (env NANODIST_RUN_ID)",
    )
    parser.add_argument("--runs-dir", default=env("runs_dir", "runs"), help="where runs/<run-id>/ goes")
    parser.add_argument("--backend", default=env("backend", "single"), help="mpi, tcp or single")
    parser.add_argument("--group-id", type=int, default=env("group_id", 0))
    parser.add_argument("--num-groups", type=int, default=env("num_groups", 1))
    parser.add_argument(
        "--group-size",
        type=int,
        default=env("group_size", 1),
        help="ranks in this group; 0 (tcp only) takes every worker that joins within --join-window",
    )
    parser.add_argument(
        "--join-window",
        type=float,
        default=env("join_window", 5.0),
        help="with --group-size 0: the group closes after this many seconds without a new member",
    )
    parser.add_argument(
        "--flat",
        action="store_true",
        default=env("flat", "") == "1",
        help="every worker pushes and pulls (no group allreduce)",
    )
    parser.add_argument("--mode", default=env("mode", "bsp"), help="bsp, asp or ssp; must match the servers")
    parser.add_argument("--staleness", type=int, default=env("staleness", 0))
    parser.add_argument("--epochs", type=int, default=env("epochs", 10))
    parser.add_argument("--batch-size", type=int, default=env("batch_size", 16), help="per worker")
    parser.add_argument("--lr", type=float, default=env("lr", 0.3), help="SGD learning rate, applied by the server")
    parser.add_argument("--hidden", default=env("hidden", "64"), help="hidden layer sizes, e.g. 128,64; '' for none")
    parser.add_argument("--seed", type=int, default=env("seed", 0))
    parser.add_argument("--max-steps", type=int, default=env("max_steps", 0), help="stop after this many steps")
    parser.add_argument(
        "--slow-ms", type=int, default=env("slow_ms", 0), help="sleep this long per step (to study stragglers)"
    )
    parser.add_argument("--dump-params", default="", help="rank 0 saves the final parameters to this .npz")
    parser.add_argument(
        "--timeout",
        type=float,
        default=env("timeout", 60.0),
        help="longest wait for any peer, server or barrier, in seconds",
    )
    parser.add_argument(
        "--pipeline-stages",
        type=int,
        default=env("pipeline_stages", 0),
        help="split the model into this many stages, one per rank of the group (pipeline parallelism)",
    )
    parser.add_argument(
        "--micro-batches", type=int, default=env("micro_batches", 4), help="micro-batches per batch in a pipeline"
    )
    parser.add_argument(
        "--schedule", choices=["1f1b", "gpipe"], default=env("schedule", "1f1b"), help="pipeline schedule"
    )
    parser.add_argument(
        "--pipeline-split",
        default=env("pipeline_split", ""),
        help="layers per stage, e.g. 2,1 (default: balanced by parameter count)",
    )
    add_client_security_flags(parser)


def add_client_security_flags(parser: argparse.ArgumentParser) -> None:
    """TLS and token options for every channel this process opens (they set the NANODIST_* equivalents)."""
    parser.add_argument("--tls-ca", help="CA to verify servers with; enables TLS (env NANODIST_TLS_CA)")
    parser.add_argument("--tls-client-cert", help="client certificate for mutual TLS (env NANODIST_TLS_CLIENT_CERT)")
    parser.add_argument("--tls-client-key", help="its private key (env NANODIST_TLS_CLIENT_KEY)")
    parser.add_argument(
        "--tls-server-name", help="name to expect in server certificates (env NANODIST_TLS_SERVER_NAME)"
    )
    parser.add_argument(
        "--auth-token-file", help="file whose first field is the bearer token (env NANODIST_AUTH_TOKEN_FILE)"
    )


def apply_client_security_flags(args: argparse.Namespace) -> None:
    for flag in ("tls_ca", "tls_client_cert", "tls_client_key", "tls_server_name", "auth_token_file"):
        value = getattr(args, flag, None)
        if value:
            os.environ[f"NANODIST_{flag.upper()}"] = value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    hidden = tuple(int(h) for h in str(args.hidden).split(",") if h.strip())
    return TrainConfig(
        ps=[a for a in str(args.ps).split(",") if a],
        barrier=args.barrier,
        lock=args.lock,
        run_id=args.run_id,
        runs_dir=args.runs_dir,
        backend=args.backend,
        group_id=args.group_id,
        num_groups=args.num_groups,
        group_size=args.group_size,
        flat=args.flat,
        mode=args.mode,
        staleness=args.staleness,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        hidden=hidden,
        seed=args.seed,
        max_steps=args.max_steps,
        slow_ms=args.slow_ms,
        join_window=args.join_window,
        dump_params=args.dump_params,
        timeout=args.timeout,
        pipeline_stages=args.pipeline_stages,
        micro_batches=args.micro_batches,
        schedule=args.schedule,
        pipeline_split=tuple(int(n) for n in str(args.pipeline_split).split(",") if n.strip()),
    )


def run(args: argparse.Namespace) -> None:
    worker = None
    apply_client_security_flags(args)
    try:
        config = config_from_args(args)
        if config.pipeline_stages > 1:
            from nanodist.workers.pipeline_worker import PipelineWorker  # late: it builds on this module

            worker = PipelineWorker(config)
        else:
            worker = Worker(config)
        worker.train()
    except (ConfigError, CommError, NanodistError) as error:
        print(f"nanodist worker: error: {error}", file=sys.stderr, flush=True)
        if worker is not None:
            if not isinstance(error, BarrierBroken):
                worker.abort(str(error))
            sys.stdout.flush()
            worker.comm.abort()
        raise SystemExit(2 if isinstance(error, ConfigError) else 1) from None
    finally:
        if worker is not None:
            worker.close()
