"""Small Python values as bytes that are safe to read from the network: no pickle.

broadcast_object and allgather_object move a rank's value to others through the
job's key-value store. Horovod pickles such values; a receiver here must never
run code because a peer (or anyone who can write the store) sent it, so values
are JSON with their tensors and arrays carried beside it in an .npz archive,
which numpy reads without pickle. What JSON cannot say (a set, a class
instance) is refused on the sending rank, naming its type.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch


class NotSendable(TypeError):
    """A value that broadcast_object or allgather_object cannot carry."""


def encode(value: Any) -> bytes:
    arrays: list[np.ndarray] = []
    skeleton = _split(value, arrays, "value")
    out = io.BytesIO()
    named: dict[str, np.ndarray] = {f"a{i}": a for i, a in enumerate(arrays)}
    named["skeleton"] = np.frombuffer(json.dumps(skeleton).encode(), dtype=np.uint8)
    np.savez(out, **named)  # type: ignore[arg-type]  # numpy's stub reads ** as its allow_pickle flag
    return out.getvalue()


def decode(data: bytes) -> Any:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        skeleton = json.loads(archive["skeleton"].tobytes())
        arrays = {name: archive[name] for name in archive.files if name != "skeleton"}
    return _join(skeleton, arrays)


def _split(value: Any, arrays: list[np.ndarray], where: str) -> Any:
    """JSON in which each tensor or array is a placeholder naming its place in `arrays`."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        # numpy has no bfloat16: it travels as float32, which holds every bfloat16 exactly.
        wire = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        arrays.append(wire.contiguous().numpy())
        return {"__tensor__": len(arrays) - 1, "dtype": str(tensor.dtype).removeprefix("torch.")}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise NotSendable(f"{where}: an array of Python objects cannot be sent without pickle")
        arrays.append(value)
        return {"__array__": len(arrays) - 1}
    if isinstance(value, list | tuple):
        items = [_split(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        # JSON keys are strings only: the pairs keep int and tuple keys (a state dict's parameter ids) intact.
        return {"__map__": [[_split(k, arrays, where), _split(v, arrays, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise NotSendable(
        f"{where}: {type(value).__name__} cannot be sent; objects travel as JSON values (None, bool, int, float, "
        "str, list, tuple, dict) and tensors or arrays, never pickled"
    )


def _join(skeleton: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(skeleton, list):
        return [_join(v, arrays) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        tensor = torch.from_numpy(arrays[f"a{skeleton['__tensor__']}"].copy())
        return tensor.to(getattr(torch, skeleton["dtype"]))
    if "__array__" in skeleton:
        return arrays[f"a{skeleton['__array__']}"]
    if "__tuple__" in skeleton:
        return tuple(_join(v, arrays) for v in skeleton["__tuple__"])
    return {_join(k, arrays): _join(v, arrays) for k, v in skeleton["__map__"]}
