"""Copy one worker's tensors to every worker: inside each group over MPI or TCP, across groups
through the parameter servers (the root's group leader creates keys that the other leaders pull)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from nanodist.client import sgd
from nanodist.torch.reducer import as_numpy
from nanodist.workers.job import Job

_calls = itertools.count()  # every rank broadcasts in the same order, so the n-th call has one name


def _transport_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameter-server keys hold floats, so integers and bools travel as float64: exact below 2**53,
    which counters such as BatchNorm's num_batches_tracked never reach."""
    return dtype if dtype.is_floating_point else torch.float64


def broadcast_tensors(job: Job, tensors: list[torch.Tensor], root_rank: int, name: str | None = None) -> None:
    """Overwrite every rank's `tensors` (same shapes and dtypes everywhere) with root_rank's, in place.
    `name`: the call's keys, when the ranks may have made different numbers of calls before (a worker
    that joined late)."""
    if not 0 <= root_rank < job.world:
        raise ValueError(f"root_rank {root_rank} is outside [0, {job.world})")
    if job.world == 1 or not tensors:
        return
    name = name or f"{job.config.run_id}/torch/broadcast/{next(_calls)}"
    packs = _pack(tensors)
    sizes = job.group_sizes
    root_group = next(g for g in range(len(sizes)) if root_rank < sum(sizes[: g + 1]))
    root_local = root_rank - sum(sizes[:root_group])
    arrays = [as_numpy(flat) for flat in packs.values()]
    if job.group_index == root_group:
        for array in arrays:
            job.comm.broadcast(array, root=root_local)
        if len(sizes) > 1 and job.is_leader:
            assert job.ps is not None
            job.client().init({f"{name}/{i}": a for i, a in enumerate(arrays)}, sgd(1.0))
            job.kv.set(f"{name}/ready", "1")
    else:
        if job.is_leader:
            assert job.ps is not None
            job.kv.wait([f"{name}/ready"], timeout=job.config.timeout)
            values = job.ps.pull([f"{name}/{i}" for i in range(len(arrays))])
            for i, array in enumerate(arrays):
                array[:] = values[f"{name}/{i}"]
        for array in arrays:
            job.comm.broadcast(array, root=0)
    _unpack(tensors, packs)


def _pack(tensors: list[torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
    """One flat host buffer per transport dtype, so a broadcast moves few large messages."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(_transport_dtype(tensor.dtype), []).append(tensor)
    return {
        dtype: torch.cat([t.detach().reshape(-1).to("cpu", dtype) for t in group]) for dtype, group in by_dtype.items()
    }


def _unpack(tensors: list[torch.Tensor], packs: dict[torch.dtype, torch.Tensor]) -> None:
    offsets = dict.fromkeys(packs, 0)
    with torch.no_grad():
        for tensor in tensors:
            dtype = _transport_dtype(tensor.dtype)
            n = tensor.numel()
            tensor.copy_(packs[dtype][offsets[dtype] : offsets[dtype] + n].view(tensor.shape))
            offsets[dtype] += n


def broadcast_parameters(
    job: Job,
    params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    root_rank: int,
    name: str | None = None,
) -> None:
    items = sorted(params.items() if isinstance(params, Mapping) else params, key=lambda kv: kv[0])
    broadcast_tensors(job, [t for _, t in items if isinstance(t, torch.Tensor)], root_rank, name)


def broadcast_optimizer_state(
    job: Job, optimizer: torch.optim.Optimizer, root_rank: int, name: str | None = None
) -> None:
    """Every rank ends with root_rank's optimizer state (momentum buffers, Adam moments, step counts,
    learning rates), even a rank whose optimizer has taken no step yet. `name`: the call's key, when
    the ranks may have made different numbers of calls before (a worker that joined late)."""
    if job.world == 1:
        return
    name = name or f"{job.config.run_id}/torch/optimizer-state/{next(_calls)}"
    if job.rank == root_rank:
        skeleton, tensors = _split_state(optimizer.state_dict())
        job.kv.set(name, json.dumps(skeleton))
    else:
        job.kv.wait([name], timeout=job.config.timeout)
        skeleton = json.loads(job.kv.get(name))
        tensors = _allocate(skeleton)
    broadcast_tensors(job, tensors, root_rank, f"{name}/tensors")
    if job.rank != root_rank:
        optimizer.load_state_dict(_join_state(skeleton, tensors))


def _split_state(value: Any, out: list[torch.Tensor] | None = None) -> tuple[Any, list[torch.Tensor]]:
    """JSON with tensors replaced by placeholders, and the tensors in placeholder order."""
    tensors = [] if out is None else out
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach().cpu().clone())
        return {
            "__tensor__": len(tensors) - 1,
            "dtype": str(value.dtype).removeprefix("torch."),
            "shape": list(value.shape),
        }, tensors
    if isinstance(value, Mapping):
        # JSON keys are strings; the state dict's parameter ids are ints, so mark them.
        return {"__map__": [[k, _split_state(v, tensors)[0]] for k, v in value.items()]}, tensors
    if isinstance(value, list | tuple):
        return [_split_state(v, tensors)[0] for v in value], tensors
    return value, tensors


def _allocate(skeleton: Any, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    tensors = [] if out is None else out
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        tensors.append(torch.zeros(skeleton["shape"], dtype=getattr(torch, skeleton["dtype"])))
    elif isinstance(skeleton, dict):
        for _, v in skeleton["__map__"]:
            _allocate(v, tensors)
    elif isinstance(skeleton, list):
        for v in skeleton:
            _allocate(v, tensors)
    return tensors


def _join_state(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict):
        return {k: _join_state(v, tensors) for k, v in skeleton["__map__"]}
    if isinstance(skeleton, list):
        return [_join_state(v, tensors) for v in skeleton]
    return skeleton
