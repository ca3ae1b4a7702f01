"""Safe serialisation of trainable state for exact resume: safetensors + JSON, nothing pickled.

HF Trainer and most recipes save optimizer, scheduler and RNG state with ``torch.save`` (pickle),
which executes code on load. Here every component is split by :func:`split_tensors` into a JSON
tree and a flat ``name -> tensor`` map written with safetensors; loading reads JSON and
safetensors only (never ``torch.load``). Together with the data position this is what exact resume
needs (RNG states, data order/position, optimizer and scheduler — REFERENCES.md "Training health"),
proven by comparing the per-step losses of a resumed run with an uninterrupted one.

Files of one captured state (logical names inside a snapshot)::

    state.json                      index: schema_version, components, torch version, parameter names
    model/trainable.safetensors     parameters with requires_grad (adapters, new blocks)
    optimizer/state.json            optimizer.state_dict() with tensors replaced by references
    optimizer/tensors.safetensors   those tensors
    scheduler/state.json            lr_scheduler.state_dict()
    rng/state.json                  python `random`, numpy legacy global state
    rng/tensors.safetensors         torch CPU (and CUDA, one per device) generator states
    data/position.json              opaque dict from the data loader (epoch, batch index, seed, ...)

JSON tree encoding: dicts with string keys stay dicts; other dicts become
``{"__dict_items__": [[k, v], ...]}``; tuples ``{"__tuple__": [...]}``; tensors
``{"__tensor__": "<name>"}``; non-finite floats ``{"__float__": "nan"|"inf"|"-inf"}``.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import ScalerWizardError
from .checkpoints import PHASE_TRAIN, CheckpointCache, SnapshotInfo

STATE_SCHEMA_VERSION = 1
_MARKERS = ("__dict_items__", "__tuple__", "__tensor__", "__float__")


class StateFormatError(ScalerWizardError):
    """Training state cannot be stored safely, or stored state does not fit the live objects."""


# ----------------------------------------------------------------------------- JSON + tensors codec


def split_tensors(obj: Any, path: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into (JSON-able tree, flat tensors). Raises on any type that would
    need pickle, naming where it was found."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(obj, path or "root", tensors), tensors


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return (
            obj
            if math.isfinite(obj)
            else {"__float__": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
        )
    if isinstance(obj, np.generic):
        return _encode(obj.item(), path, tensors)
    if isinstance(obj, np.ndarray):
        return _encode(torch.from_numpy(obj.copy()), path, tensors)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {
            "__dict_items__": [
                [_encode(k, f"{path}.key{i}", tensors), _encode(v, f"{path}.{k}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise StateFormatError(
        f"State value at {path} has type {type(obj).__name__}, which cannot be stored without pickle.",
        hint="Keep optimizer/scheduler/data-position state to tensors, numbers, strings, lists and dicts.",
    )


def join_tensors(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        name = tree["__tensor__"]
        if name not in tensors:
            raise StateFormatError(
                f"Stored state refers to tensor {name!r}, missing from its safetensors file."
            )
        return tensors[name]
    if "__float__" in tree:
        return float(tree["__float__"])
    if "__tuple__" in tree:
        return tuple(join_tensors(v, tensors) for v in tree["__tuple__"])
    if "__dict_items__" in tree:
        return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in tree["__dict_items__"]}
    return {k: join_tensors(v, tensors) for k, v in tree.items()}


def _json_bytes(tree: Any) -> bytes:
    # sort_keys: identical state gives identical bytes, so the cache stores it once.
    return (json.dumps(tree, sort_keys=True, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")


def _component(name: str, obj: Any) -> dict[str, bytes]:
    tree, tensors = split_tensors(obj, name)
    files = {f"{name}/state.json": _json_bytes(tree)}
    if tensors:
        files[f"{name}/tensors.safetensors"] = st_save(tensors)
    return files


def _read(src: bytes | Path | str) -> bytes:
    return src if isinstance(src, bytes) else Path(src).read_bytes()


def load_component(files: Mapping[str, bytes | Path | str], name: str) -> Any:
    tree = json.loads(_read(files[f"{name}/state.json"]).decode("utf-8"))
    key = f"{name}/tensors.safetensors"
    tensors = st_load(_read(files[key])) if key in files else {}
    return join_tensors(tree, tensors)


# ----------------------------------------------------------------------------- capture


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters that training changes (LoRA adapters, new blocks): ``requires_grad=True``."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """Every global generator a training step may draw from (dropout, shuffling, sampling)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def capture_training_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data_position: Mapping[str, Any] | None = None,
    include_rng: bool = True,
) -> dict[str, bytes]:
    """Serialise live training state into snapshot files (logical name -> bytes)."""
    params = trainable_parameters(model)
    if not params:
        raise StateFormatError(
            "The model has no trainable parameters to snapshot.",
            hint="Attach adapters or unfreeze the new blocks before training.",
        )
    files = {
        "model/trainable.safetensors": st_save(
            {n: p.detach().to("cpu").contiguous().clone() for n, p in params.items()}
        )
    }
    components = ["model"]
    if optimizer is not None:
        files.update(_component("optimizer", optimizer.state_dict()))
        components.append("optimizer")
    if scheduler is not None:
        files.update(_component("scheduler", scheduler.state_dict()))
        components.append("scheduler")
    if include_rng:
        files.update(_component("rng", rng_state()))
        components.append("rng")
    if data_position is not None:
        tree, tensors = split_tensors(dict(data_position), "data")
        if tensors:
            raise StateFormatError(
                f"Data position holds tensors ({', '.join(sorted(tensors))}).",
                hint="Store the data position as plain numbers (epoch, batch index, seed).",
            )
        files["data/position.json"] = _json_bytes(tree)
        components.append("data")
    files["state.json"] = _json_bytes(
        {
            "schema_version": STATE_SCHEMA_VERSION,
            "components": components,
            "torch": torch.__version__,
            "trainable": sorted(params),
            "trainable_numel": sum(p.numel() for p in params.values()),
        }
    )
    return files


# ----------------------------------------------------------------------------- apply


@dataclass
class RestoredState:
    """What :func:`apply_training_state` put back, plus the data position for the loader."""

    components: list[str]
    data_position: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)


def load_trainable(model: torch.nn.Module, stored: Mapping[str, torch.Tensor]) -> None:
    """Copy stored tensors into the live trainable parameters in place (the optimizer keeps
    pointing at the same Parameter objects). Names must match exactly."""
    live = trainable_parameters(model)
    missing, unexpected = sorted(set(live) - set(stored)), sorted(set(stored) - set(live))
    if missing or unexpected:
        raise StateFormatError(
            f"Snapshot parameters do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.",
            hint="Resume with the same recipe (same adapters / target modules / new blocks) that wrote the snapshot.",
        )
    with torch.no_grad():
        for name, param in live.items():
            src = stored[name]
            if src.shape != param.shape:
                raise StateFormatError(
                    f"Parameter {name}: snapshot shape {tuple(src.shape)} != model {tuple(param.shape)}."
                )
            param.copy_(src.to(device=param.device, dtype=param.dtype))


def set_rng_state(state: Mapping[str, Any]) -> list[str]:
    """Restore generators; returns what could not be restored (e.g. CUDA state on a CPU machine)."""
    skipped = []
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1].numpy(), dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in state["cuda"]])
        else:
            skipped.append("rng.cuda")
            warnings.warn(
                "Snapshot holds CUDA RNG states for a different device count; CUDA generators not restored, "
                "so dropout on GPU will not replay exactly.",
                stacklevel=2,
            )
    return skipped


def apply_training_state(
    files: Mapping[str, bytes | Path | str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> RestoredState:
    """Load snapshot files (logical name -> bytes or path) into live objects.

    The optimizer and scheduler must be built the same way as when the state was captured
    (same parameter order and groups); ``load_state_dict`` checks the group sizes."""
    index = json.loads(_read(files["state.json"]).decode("utf-8"))
    if int(index.get("schema_version", 0)) > STATE_SCHEMA_VERSION:
        raise StateFormatError(
            f"Training state schema {index['schema_version']} is newer than this version "
            f"reads ({STATE_SCHEMA_VERSION}).",
            hint="Upgrade scaler-wizard to resume this run.",
        )
    present = list(index["components"])
    result = RestoredState(components=[])
    load_trainable(model, st_load(_read(files["model/trainable.safetensors"])))
    result.components.append("model")
    if optimizer is not None:
        _require(present, "optimizer")
        optimizer.load_state_dict(load_component(files, "optimizer"))
        result.components.append("optimizer")
    if scheduler is not None:
        _require(present, "scheduler")
        scheduler.load_state_dict(load_component(files, "scheduler"))
        result.components.append("scheduler")
    if restore_rng and "rng" in present:
        result.skipped += set_rng_state(load_component(files, "rng"))
        result.components.append("rng")
    if "data" in present:
        result.data_position = read_data_position(files)
        result.components.append("data")
    return result


def read_data_position(files: Mapping[str, bytes | Path | str]) -> dict[str, Any] | None:
    """The snapshot's data position (plain JSON, non-finite floats decoded), or None."""
    if "data/position.json" not in files:
        return None
    return join_tensors(json.loads(_read(files["data/position.json"]).decode("utf-8")), {})


def _require(present: list[str], name: str) -> None:
    if name not in present:
        raise StateFormatError(
            f"The snapshot has no {name} state (components: {', '.join(present)}).",
            hint=f"Resume without a {name}, or from a snapshot that saved one.",
        )


# ----------------------------------------------------------------------------- cache bridge


def save_snapshot(
    cache: CheckpointCache,
    run_id: str,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data_position: Mapping[str, Any] | None = None,
    stage: int | str | None = None,
    phase: str = PHASE_TRAIN,
    metrics: Mapping[str, Any] | None = None,
    pinned: bool = False,
    extra_files: Mapping[str, bytes | Path | str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> SnapshotInfo:
    """Capture live state and commit it as one atomic snapshot (main process only).
    ``extra_files`` (e.g. ``adapter_config.json``) are stored beside the state, deduplicated."""
    files: dict[str, bytes | Path | str] = dict(extra_files or {})
    files.update(
        capture_training_state(
            model=model, optimizer=optimizer, scheduler=scheduler, data_position=data_position
        )
    )
    return cache.commit(
        run_id, files, step=step, stage=stage, phase=phase, metrics=metrics, pinned=pinned, extra=extra
    )


def load_snapshot(
    cache: CheckpointCache,
    snap: SnapshotInfo,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> RestoredState:
    """Verify ``snap`` and load it into live objects straight from the blob store (no copy)."""
    files = cache.open_files(snap, verify=True)
    return apply_training_state(
        files, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=restore_rng
    )
