"""The settings of a training worker, each declared once (flag, NANODIST_* variable, default, help).

`nanodist worker`, `nanodist up` (which passes them on to its workers) and
`nanodist status` take their flags from here; see nanodist.workers.settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanodist.client import ClientSecurity
from nanodist.workers.settings import setting


class ConfigError(ValueError):
    """The worker was started with settings that cannot work; the message says which."""


@dataclass(kw_only=True)
class Endpoints:
    """Where the services of a cluster listen."""

    ps: tuple[str, ...] = setting(
        ("127.0.0.1:50051",),
        flag="--ps",
        help="comma-separated parameter-server shard addresses; a replicated shard names its replicas A+B",
    )
    barrier: str = setting(
        "127.0.0.1:50061",
        flag="--barrier",
        help="barrier service address (replicas: HOST:PORT,HOST:PORT)",
        env="BARRIER_ADDRESS",
    )
    lock: str = setting(
        "127.0.0.1:50071",
        flag="--lock",
        help="lock service address (replicas: HOST:PORT,HOST:PORT)",
        env="LOCK_ADDRESS",
    )


@dataclass(kw_only=True)
class JobConfig(Endpoints):
    """How a worker joins a job: what `nanodist run` and the compose files give every worker,
    the numpy worker and a nanodist.torch script alike."""

    run_id: str = setting(flag="--run-id", help="names this run's keys, barriers and output folder; fresh per run")
    runs_dir: str = setting("runs", flag="--runs-dir", help="where runs/<run-id>/ goes")
    backend: str = setting("single", flag="--backend", help="the group's collectives: mpi, tcp or single")
    group_id: int = setting(0, flag="--group-id", help="this worker's group, in [0, --num-groups)")
    num_groups: int = setting(1, flag="--num-groups", help="worker groups in the job")
    group_size: int = setting(
        1,
        flag="--group-size",
        help="ranks in this group; 0 (tcp only) takes every worker that joins within --join-window",
    )
    flat: bool = setting(False, flag="--flat", help="every worker pushes and pulls (no group allreduce)")
    mode: str = setting("bsp", flag="--mode", help="bsp, asp or ssp; must match the servers")
    staleness: int = setting(0, flag="--staleness", help="the SSP bound; must match the servers")
    join_window: float = setting(
        5.0,
        flag="--join-window",
        help="a TCP group whose size is not fixed (nanodist worker --group-size 0; every group of nanodist run "
        "--elastic) closes after this many seconds without a new member",
    )
    timeout: float = setting(60.0, flag="--timeout", help="longest wait for any peer, server or barrier, in seconds")
    session_ttl: float = setting(
        5.0,
        flag="--session-ttl",
        help="a worker's barrier lease, in seconds: a worker that dies or freezes is named this long after its "
        "last renewal; one starved of CPU for longer is left behind",
    )
    elastic: bool = setting(
        False,
        flag="--elastic",
        help="keep training when a worker is lost: the others form a new generation without it "
        "(a TCP group re-forms with the workers left; an MPI group leaves whole and may come back)",
    )
    min_workers: int = setting(1, flag="--min-workers", help="with --elastic: stop when fewer workers are left")
    regroup_window: float = setting(
        5.0,
        flag="--regroup-window",
        help="with --elastic: a new generation closes after this many seconds without a newcomer, "
        "or at once when every other member of the last one has come back after a loss",
    )
    max_workers: int = setting(
        0,
        flag="--max-workers",
        help="with --elastic: the group takes at most this many; more wait for a free place (0: no bound)",
    )

    def validate(self) -> None:
        if self.backend not in ("mpi", "tcp", "single"):
            raise ConfigError(f"--backend {self.backend!r} is unknown; choose mpi, tcp or single")
        if self.mode not in ("bsp", "asp", "ssp"):
            raise ConfigError(f"--mode {self.mode!r} is unknown; choose bsp, asp or ssp")
        if not 0 <= self.group_id < self.num_groups:
            raise ConfigError(f"--group-id {self.group_id} is outside [0, {self.num_groups})")
        if self.group_size < 0:
            raise ConfigError("--group-size must be >= 0")
        if self.group_size == 0 and self.backend != "tcp":
            raise ConfigError("--group-size 0 (join as many as arrive) needs --backend tcp")
        if not self.ps:
            raise ConfigError("--ps needs at least one parameter-server address")
        if self.elastic and self.backend == "tcp" and self.group_size != 0:
            raise ConfigError("--elastic re-forms a TCP group from the workers left: it needs --group-size 0")
        if self.elastic and self.backend == "single":
            raise ConfigError("--elastic needs --backend tcp (a group that re-forms) or mpi (restarted whole)")
        if self.session_ttl <= 0:
            raise ConfigError(f"--session-ttl must be > 0 seconds, not {self.session_ttl:g}")
        if self.min_workers < 1:
            raise ConfigError("--min-workers must be >= 1")
        if self.max_workers and self.max_workers < self.min_workers:
            raise ConfigError(f"--max-workers {self.max_workers} is below --min-workers {self.min_workers}")


@dataclass(kw_only=True)
class TrainConfig(JobConfig):
    """The numpy worker's settings: the job's, and how to train the built-in MLP."""

    epochs: int = setting(10, flag="--epochs", help="passes over the training data")
    batch_size: int = setting(16, flag="--batch-size", help="samples per step, per worker")
    learning_rate: float = setting(0.3, flag="--lr", help="SGD learning rate, applied by the server")
    hidden: tuple[int, ...] = setting((64,), flag="--hidden", help="hidden layer sizes, e.g. 128,64; '' for none")
    seed: int = setting(0, flag="--seed", help="seeds the initial parameters and the data shards")
    max_steps: int = setting(0, flag="--max-steps", help="stop after this many steps; 0: run every epoch")
    slow_ms: int = setting(0, flag="--slow-ms", help="sleep this long per step (to study stragglers)")
    dump_params: str = setting("", flag="--dump-params", help="rank 0 saves the final parameters to this .npz")
    pipeline_stages: int = setting(
        0,
        flag="--pipeline-stages",
        help="> 1: split the model into this many stages, one per rank of the group (pipeline parallelism)",
    )
    micro_batches: int = setting(4, flag="--micro-batches", help="micro-batches per batch in a pipeline")
    schedule: str = setting("1f1b", flag="--schedule", help="pipeline schedule", choices=("1f1b", "gpipe"))
    pipeline_split: tuple[int, ...] = setting(
        (), flag="--pipeline-split", help="layers per pipeline stage, e.g. 2,1 (default: balanced by parameter count)"
    )

    def validate(self) -> None:
        super().validate()
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ConfigError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if self.pipeline_stages > 1:
            self._validate_pipeline()

    def _validate_pipeline(self) -> None:
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


@dataclass(kw_only=True)
class SecurityFlags:
    """TLS and token settings for every channel a worker or `nanodist status` opens."""

    ca: str | None = setting(None, flag="--tls-ca", help="CA to verify servers with; enables TLS")
    cert: str | None = setting(None, flag="--tls-client-cert", help="client certificate for mutual TLS")
    key: str | None = setting(None, flag="--tls-client-key", help="its private key")
    server_name: str | None = setting(None, flag="--tls-server-name", help="name to expect in server certificates")
    token_file: str | None = setting(
        None, flag="--auth-token-file", help="file whose first field is the bearer token sent with every call"
    )

    def client_security(self) -> ClientSecurity:
        return ClientSecurity(self.ca, self.cert, self.key, self.server_name, self.token_file)
