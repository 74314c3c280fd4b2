"""Parameter-server checkpoints: a self-describing directory, written atomically, never pickled.

A checkpoint is `ckpt-<sequence>/` holding one .npy file per array (values,
optimizer state and BSP sums still waiting for pushes) and `manifest.json`
with each key's dtype, shape, version, optimizer and the SHA-256 of every
file, plus the request_id dedup window and the write-ahead-log LSN covered.
It is written under a temporary name, fsynced, renamed into place and the
directory fsynced, so a crash leaves the previous checkpoint intact. On start the newest checkpoint whose files match
their checksums is restored; a damaged one is logged and skipped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from typing import Any

import numpy as np

from nanodist.services.common.durable import fsync_dir
from nanodist.services.parameter_server.optimizers import Optimizer, OptimizerConfig
from nanodist.services.parameter_server.row_table import RowTable, TableShape
from nanodist.services.parameter_server.store import Pending, Slot, Store

FORMAT = 1
KEEP = 2
log = logging.getLogger("nanodist.ps.checkpoint")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def snapshot(store: Store, wal_lsn: int | None = None) -> dict[str, Any]:
    """Copies of everything a checkpoint holds, taken at one instant (cheap to hand to a thread).

    `wal_lsn` is the first write-ahead-log record the snapshot does not include.
    """
    keys = {}
    for key, slot in store.slots.items():
        table = slot.table
        if table is None:
            ids, value, states = None, slot.value.copy(), [s.copy() for s in slot.optimizer.states]
        else:
            ids, value, states = table.snapshot()  # only the rows that exist
        keys[key] = {
            "value": value,
            "states": states,
            "table": None if table is None else _table_meta(table.shape),
            "ids": ids,
            "version": slot.version,
            "applied_step": slot.applied_step,
            "membership": [slot.generation, slot.pushers],
            "optimizer": asdict(slot.optimizer.config),
            "optimizer_steps": slot.optimizer.steps,
            # BSP sums still waiting for pushes: a restart must not forget the pushes already acknowledged
            "pending": [
                (
                    step,
                    sorted(p.workers),
                    p.dense,
                    p.total.copy(),
                    None if p.touched is None else p.touched.copy(),
                    None if p.rows is None else p.rows.copy(),
                )
                for step, p in slot.pending.items()
            ],
        }
    return {
        "keys": keys,
        "fencing_high": store.fencing_high,
        "clocks": dict(store.clocks),
        "membership": [store.generation, store.pushers],
        "dedup": [(rid, base64.b64encode(response).decode()) for rid, response in store.recent_requests()],
        "wal_lsn": wal_lsn,
    }


def _save(directory: str, filename: str, array: np.ndarray) -> str:
    """Write one array durably; returns its SHA-256."""
    path = os.path.join(directory, filename)
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return _sha256(path)


def write(directory: str, snap: dict[str, Any]) -> str:
    """Write `snap` as the next checkpoint in `directory`; returns its path."""
    os.makedirs(directory, exist_ok=True)
    existing = _sequences(directory)
    sequence = (existing[-1] + 1) if existing else 1
    final = os.path.join(directory, f"ckpt-{sequence:08d}")
    tmp = os.path.join(directory, f".tmp-ckpt-{sequence:08d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "fencing_high": snap["fencing_high"],
        "clocks": {str(k): v for k, v in snap["clocks"].items()},
        "membership": snap["membership"],
        "dedup": snap["dedup"],
        "wal_lsn": snap["wal_lsn"],
        "keys": {},
    }
    for index, (key, item) in enumerate(snap["keys"].items()):
        files = {f"k{index}.value.npy": _save(tmp, f"k{index}.value.npy", item["value"])}
        for i, state in enumerate(item["states"]):
            files[f"k{index}.state{i}.npy"] = _save(tmp, f"k{index}.state{i}.npy", state)
        if item["ids"] is not None:
            files[f"k{index}.ids.npy"] = _save(tmp, f"k{index}.ids.npy", item["ids"])
        pending = []
        for step, workers, dense, total, touched, rows in item["pending"]:
            files[f"k{index}.pending{step}.npy"] = _save(tmp, f"k{index}.pending{step}.npy", total)
            if touched is not None:
                files[f"k{index}.touched{step}.npy"] = _save(tmp, f"k{index}.touched{step}.npy", touched)
            if rows is not None:
                files[f"k{index}.rows{step}.npy"] = _save(tmp, f"k{index}.rows{step}.npy", rows)
            pending.append(
                {
                    "step": step,
                    "workers": workers,
                    "dense": dense,
                    "sparse": touched is not None,
                    "rows": rows is not None,
                }
            )
        manifest["keys"][key] = {
            "index": index,
            "dtype": item["value"].dtype.str,
            "shape": list(item["value"].shape),
            "version": item["version"],
            "applied_step": item["applied_step"],
            "membership": item["membership"],
            "optimizer": item["optimizer"],
            "optimizer_steps": item["optimizer_steps"],
            "states": len(item["states"]),
            "table": item["table"],
            "pending": pending,
            "sha256": files,
        }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(directory)
    for old in existing[: max(0, len(existing) + 1 - KEEP)]:
        shutil.rmtree(os.path.join(directory, f"ckpt-{old:08d}"), ignore_errors=True)
    return final


def _sequences(directory: str) -> list[int]:
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith("ckpt-") and name[5:].isdigit():
            found.append(int(name[5:]))
    return sorted(found)


def wal_lsns(directory: str) -> list[int]:
    """The write-ahead-log LSNs the kept checkpoints cover; the log must be kept from the oldest."""
    found = []
    for sequence in _sequences(directory):
        try:
            with open(os.path.join(directory, f"ckpt-{sequence:08d}", "manifest.json")) as f:
                lsn = json.load(f).get("wal_lsn")
        except (OSError, ValueError):
            continue
        if lsn is not None:
            found.append(lsn)
    return found


def _load(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"unknown checkpoint format {manifest.get('format')!r}")
    keys = {}
    for key, meta in manifest["keys"].items():
        arrays = {}
        for filename, digest in meta["sha256"].items():
            file_path = os.path.join(path, filename)
            if _sha256(file_path) != digest:
                raise ValueError(f"{filename} does not match its checksum")
            arrays[filename] = np.load(file_path, allow_pickle=False)
        index = meta["index"]
        value = arrays[f"k{index}.value.npy"]
        if value.dtype.str != meta["dtype"] or list(value.shape) != meta["shape"]:
            raise ValueError(f"{key}: file holds {value.dtype.str}{list(value.shape)}, manifest says otherwise")
        keys[key] = (meta, value, [arrays[f"k{index}.state{i}.npy"] for i in range(meta["states"])], arrays)
    return {"manifest": manifest, "keys": keys}


def restore(directory: str, store: Store) -> tuple[str, int | None] | None:
    """Load the newest intact checkpoint into `store`.

    Returns its path and the write-ahead-log LSN it covers, or None if there is none.
    """
    for sequence in reversed(_sequences(directory)):
        path = os.path.join(directory, f"ckpt-{sequence:08d}")
        try:
            loaded = _load(path)
        except (OSError, ValueError, KeyError) as error:
            log.error("checkpoint %s is damaged (%s); trying the previous one", path, error)
            continue
        for key, (meta, value, states, arrays) in loaded["keys"].items():
            index = meta["index"]
            config = OptimizerConfig(**meta["optimizer"])
            table = None
            if meta.get("table"):
                table = RowTable(_table_shape(meta["table"]), config)
                table.restore(arrays[f"k{index}.ids.npy"], value, states)
                optimizer, value = table.optimizer, np.empty((0, value.shape[1]), value.dtype)
            else:
                optimizer = Optimizer(config, value)
                optimizer.states = states
            optimizer.steps = meta["optimizer_steps"]
            slot = Slot(
                value=value,
                optimizer=optimizer,
                version=meta["version"],
                applied_step=meta["applied_step"],
                table=table,
            )
            slot.generation, slot.pushers = meta.get("membership", (0, 0))  # none before elastic jobs
            for item in meta.get("pending", []):
                step = item["step"]
                slot.pending[step] = Pending(
                    total=arrays[f"k{index}.pending{step}.npy"],
                    workers=set(item["workers"]),
                    touched=arrays[f"k{index}.touched{step}.npy"] if item["sparse"] else None,
                    dense=item["dense"],
                    rows=arrays[f"k{index}.rows{step}.npy"] if item.get("rows") else None,
                )
            store.adopt(key, slot)
        manifest = loaded["manifest"]
        store.fencing_high = manifest["fencing_high"]
        store.clocks = {int(k): v for k, v in manifest["clocks"].items()}
        store.generation, store.pushers = manifest.get("membership", (0, 0))
        for rid, response in manifest.get("dedup", []):
            store.remember(rid, base64.b64decode(response))
        log.info("restored %d keys from %s", len(loaded["keys"]), path)
        return path, manifest.get("wal_lsn")
    return None


def _table_meta(shape: TableShape) -> dict[str, Any]:
    return {**asdict(shape), "dtype": shape.dtype.str}


def _table_shape(meta: dict[str, Any]) -> TableShape:
    return TableShape(**{**meta, "dtype": np.dtype(meta["dtype"])})
