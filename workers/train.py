"""`nanodist worker`: the flags and the entry point of a training worker.

The settings come from nanodist.workers.config; `--pipeline-stages K` (K > 1)
runs a PipelineWorker, anything else the data-parallel Worker.
"""

from __future__ import annotations

import argparse
import sys

from nanodist.client import BarrierBroken, NanodistError
from nanodist.workers.comm import CommError
from nanodist.workers.config import ConfigError, SecurityFlags, TrainConfig
from nanodist.workers.job import CutOff, JobFinished
from nanodist.workers.pipeline_worker import PipelineWorker
from nanodist.workers.settings import add_flags, from_args
from nanodist.workers.worker import Worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, TrainConfig)
    add_flags(parser, SecurityFlags)


def run(args: argparse.Namespace) -> None:
    worker: Worker | None = None
    try:
        config = from_args(TrainConfig, args)
        security = from_args(SecurityFlags, args).client_security()
        worker = PipelineWorker(config, security) if config.pipeline_stages > 1 else Worker(config, security)
        worker.train()
    except JobFinished as done:
        print(f"nanodist worker: {done}; nothing to do", flush=True)
    except (ConfigError, CommError, NanodistError) as error:
        print(f"nanodist worker: error: {error}", file=sys.stderr, flush=True)
        if worker is not None:
            if not isinstance(error, BarrierBroken | CutOff):  # a cut-off worker cannot reach the barrier
                worker.abort(str(error))
            sys.stdout.flush()
            worker.comm.abort()
        raise SystemExit(2 if isinstance(error, ConfigError) else 1) from None
    finally:
        if worker is not None:
            worker.close()
