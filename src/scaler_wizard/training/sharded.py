"""Sharded launch mode (``training.sharding: fsdp2`` under ``accelerate launch`` / ``torchrun``):
torch FSDP2, sharded snapshots through ``torch.distributed.checkpoint`` (DCP), and the gather
for the export.

* **Sharding.** After the strategy is attached (LoRA adapters, new blocks), every decoder block
  and then the transformers model (the root) go through ``fully_shard`` over a 1-D mesh of all
  processes (``init_device_mesh("cpu"|"cuda", (world_size,))``): each parameter becomes a
  ``DTensor`` whose rows are split over the processes. The model is then marked as one that owns
  its placement and gradient reduction (transformers' ``is_distributed_loading_by_transformers``),
  so the same ``ScalingTrainer`` trains it: accelerate neither wraps it in DDP nor shards it again,
  the data is split per process as under DDP, FSDP2 reduce-scatters (averages) the gradients and
  the gradient norm is reduced over the mesh.
* **Snapshots.** Every process calls :meth:`ShardedCheckpoints.commit` at the same step. The
  trainable parameters and the optimizer's tensors are written by ``dcp.save`` into a staging
  folder of the checkpoint cache (``tmp/``): each process writes its own shard file
  (``__<rank>_0.distcp``), the main one also ``.metadata``. Each process hashes the files it
  wrote (and its RNG state) and sends the hashes to the main process (byte tensors), which checks
  every file against them and commits them all, with the JSON parts (index, scheduler, the
  optimizer's non-tensor entries, run position), through the cache's atomic protocol (blobs
  fsynced, manifest, then the COMPLETE marker last). Loading verifies the snapshot (every blob
  re-hashed), links its files into a private folder and lets ``dcp.load`` read each process's
  share (a different process count is resharded by DCP).
* **Export.** :func:`gather_and_unshard` gathers the full state dict on the main process
  (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) and turns its model back
  into a plain one (FSDP hooks removed, full tensors in place of the DTensors), so the final
  probes, the adapter and the merged export run on the main process alone, as under DDP.

DCP stores its ``.metadata`` (and any non-tensor item) with pickle; only tensors go through DCP
here (everything else is JSON), and the metadata file is read only after its sha256 matched the
snapshot manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import PlanError
from ..fsutil import sha256_file

SHARD_DIR = "sharded"  # logical folder of the DCP files inside a snapshot
FORMAT = "fsdp2-dcp"


# ----------------------------------------------------------------------------- sharding


def sharding_active(recipe: Any, dist: Any) -> bool:
    return getattr(recipe.training, "sharding", "none") == "fsdp2" and dist.enabled


def decoder_blocks(model: Any) -> list[torch.nn.Module]:
    """The decoder blocks: modules whose class transformers lists as not to be split
    (``_no_split_modules``: the decoder layer classes), through a PEFT wrapper."""
    from ..models import unwrap

    base = unwrap(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if not blocks:
        raise PlanError(f"{type(base).__name__} names no decoder block class (_no_split_modules); "
                        "training.sharding: fsdp2 cannot find what to shard.",
                        hint="Use training.sharding: none (DDP) for this model.")
    return blocks


def shard_model(model: Any, world_size: int) -> Any:
    """``fully_shard`` each decoder block, then the transformers model (the root), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..models import unwrap

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world_size,))
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    base = unwrap(model)
    fully_shard(base, mesh=mesh)
    # The Trainer then treats it like a model transformers sharded at load time: no DDP wrap,
    # no second sharding, FSDP2's own gradient reduction (transformers' Trainer, distributed mixin).
    base._is_distributed_loading_by_transformers = True
    return mesh


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard_all(model: Any) -> None:
    """Free every unsharded copy (a no-grad forward leaves the root's parameters gathered), so
    what is read or written next is the sharded parameters the optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_parameter_bytes(model: Any) -> int:
    """Parameter bytes this process holds (its shards of sharded parameters)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- snapshots


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _split_optimizer_state(osd: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``get_optimizer_state_dict`` (per-parameter state keyed by name, param groups) as (the
    tensors, for DCP; everything else, for JSON)."""
    tensors: dict[str, dict[str, Any]] = {}
    plain: dict[str, dict[str, Any]] = {}
    for fqn, entry in osd["state"].items():
        tensors[fqn] = {k: v for k, v in entry.items() if _is_tensor(v)}
        plain[fqn] = {k: v for k, v in entry.items() if not _is_tensor(v)}
    return {"state": tensors}, {"state": plain, "param_groups": osd["param_groups"]}


def _join_optimizer_state(tensors: Mapping[str, Any], plain: Mapping[str, Any]) -> dict[str, Any]:
    state = {fqn: {**plain["state"].get(fqn, {}), **entry} for fqn, entry in tensors["state"].items()}
    return {"state": state, "param_groups": plain["param_groups"]}


class ShardedCheckpoints:
    """Sharded snapshots of one run in the checkpoint cache (every method is collective)."""

    def __init__(self, cache: Any, run_id: str, dist: Any):
        self.cache = cache
        self.run_id = run_id
        self.dist = dist

    # ---------------------------------------------------------------- save
    def commit(self, model: Any, step: int, stage: Any, *, pinned: bool, metrics: Mapping[str, Any] | None = None,
               position: Any = None, optimizer: Any = None, scheduler: Any = None, phase: str | None = None):
        """Write and commit a sharded snapshot; every process returns its SnapshotInfo."""
        import torch.distributed.checkpoint as dcp

        from ..cache.checkpoints import PHASE_STAGE_END, PHASE_TRAIN
        from ..cache.state import _json_bytes

        dist = self.dist
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        state, optim_json = self._capture(model, optimizer)
        # <main pid> in the name: the cache's gc keeps a staging folder whose writer is alive
        tag = dist.broadcast_text(f"{os.getpid()}.{uuid.uuid4().hex[:12]}" if dist.is_main else None)
        if dist.is_main:
            self.cache._ensure_layout()
        dist.barrier()
        folder = self.cache.tmp_dir / f"dcp.{self.run_id}.{tag}"
        dcp.save(state, checkpoint_id=str(folder))
        reported = dist.gather_text(self._write_rank_files(folder))
        dist.barrier()  # every shard is on disk before the main process reads them
        index = {"trainable": sorted(state["model"]), "world_size": dist.world_size,
                 "trainable_numel": sum(int(p.numel()) for p in model.parameters() if p.requires_grad)}

        def main_commit():
            files = self._json_files(index, optim_json, optimizer, scheduler, position)
            files.update(self._checked_rank_files(folder, reported, index, step))
            files["state.json"] = _json_bytes(index)  # the index, with every rank's hashes
            return self.cache.commit(self.run_id, files, step=step, stage=stage,
                                     phase=phase or (PHASE_TRAIN if optimizer is not None else PHASE_STAGE_END),
                                     metrics=metrics or {}, pinned=pinned,
                                     extra={"sharded": FORMAT, "world_size": dist.world_size})

        try:
            info = dist.agree(main_commit, "a sharded snapshot commit")
        finally:
            dist.barrier()
            if dist.is_main:
                shutil.rmtree(folder, ignore_errors=True)
        snapshot_id = dist.broadcast_text(info.snapshot_id if info is not None else "")
        return info if info is not None else self.cache.get(self.run_id, snapshot_id)

    @staticmethod
    def _capture(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(the tensors DCP writes: trainable parameters, optimizer tensors; the optimizer's
        non-tensor state for JSON, or None before its first step)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        reshard_all(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state: dict[str, Any] = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in trainable}}
        optim_json = None
        if optimizer is not None and optimizer.state:
            # keyed by parameter name; tensors (moments, steps) through DCP, the rest as JSON
            state["optim"], optim_json = _split_optimizer_state(get_optimizer_state_dict(model, optimizer))
        return state, optim_json

    def _write_rank_files(self, folder: Path) -> str:
        """This process's RNG state beside its shard; "name sha256" per file this process wrote
        (its shard(s), its RNG state; the main one also ``.metadata``)."""
        from ..cache.state import _component, rng_state

        rank = self.dist.rank
        files: dict[str, Path] = {f"{SHARD_DIR}/{f.name}": f for f in sorted(folder.glob(f"__{rank}_*.distcp"))}
        if self.dist.is_main:
            files[f"{SHARD_DIR}/.metadata"] = folder / ".metadata"
        for name, body in _component(f"rng/rank{rank}", rng_state()).items():
            path = self._source(folder, name, rank)
            path.write_bytes(body)
            files[name] = path
        return "\n".join(f"{name} {sha256_file(path)}" for name, path in sorted(files.items()))

    def _checked_rank_files(self, folder: Path, reported: list[str], index: dict[str, Any],
                            step: int) -> dict[str, Path]:
        """Every file each rank reported, checked against the sha256 that rank computed (what
        the rank wrote is what gets committed); the per-rank hashes go into the index."""
        from ..cache.checkpoints import SnapshotCommitError

        files: dict[str, Path] = {}
        shards: dict[str, dict[str, str]] = {}
        for rank, text in enumerate(reported):
            for line in filter(None, text.splitlines()):
                name, digest = line.rsplit(" ", 1)
                source = self._source(folder, name, rank)
                if sha256_file(source) != digest:
                    raise SnapshotCommitError(f"Shard {name} of rank {rank} changed on disk before the commit "
                                              f"of run {self.run_id} at step {step}.")
                files[name] = source
                shards.setdefault(str(rank), {})[name] = digest
        index["shards"] = shards
        return files

    @staticmethod
    def _json_files(index: dict[str, Any], optim_json: Any, optimizer: Any, scheduler: Any,
                    position: Any) -> dict[str, bytes]:
        """The snapshot's JSON parts (optimizer param groups, scheduler, run position); the
        index gets its components here, its per-rank hashes later, and is written last."""
        from ..cache.state import _component, _json_bytes, split_tensors

        files: dict[str, bytes] = {}
        components = ["model"]
        if optim_json is not None:
            files["optimizer/state.json"] = _json_bytes(split_tensors(optim_json, "optimizer")[0])
            components.append("optimizer")
        elif optimizer is not None:
            components.append("optimizer_empty")
        if scheduler is not None:
            files.update(_component("scheduler", scheduler.state_dict()))
            components.append("scheduler")
        components.append("rng")
        if position is not None:
            files["data/position.json"] = _json_bytes(split_tensors(position.to_json(), "data")[0])
            components.append("data")
        index.update(schema_version=1, format=FORMAT, components=components, torch=torch.__version__)
        return files

    @staticmethod
    def _source(folder: Path, name: str, rank: int) -> Path:
        if name.startswith(f"{SHARD_DIR}/"):
            return folder / name[len(SHARD_DIR) + 1:]
        return folder / name.replace("/", "__")

    # ---------------------------------------------------------------- load
    def load(self, model: Any, snap: Any, *, optimizer: Any = None, scheduler: Any = None,
             restore_rng: bool = False, parts: tuple[str, ...] = ("model", "optimizer", "scheduler")) -> None:
        """The snapshot's trainable weights (and optimizer / scheduler / this process's RNG state
        when asked) into the live, sharded objects. Every process verifies the snapshot first."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from ..cache.state import StateFormatError, join_tensors, load_component, set_rng_state

        dist = self.dist
        optimizer = getattr(optimizer, "optimizer", optimizer)
        files = self.cache.open_files(snap, verify=True)
        index = json.loads(Path(files["state.json"]).read_text(encoding="utf-8"))
        if index.get("format") != FORMAT:
            raise StateFormatError(f"Snapshot {snap.ref} is not a sharded ({FORMAT}) snapshot.",
                                   hint="Resume it with training.sharding: none, as it was written.")
        target = self.cache.tmp_dir / f"load.{self.run_id}.r{dist.rank}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.cache.restore(snap, target, mode="auto", verify=False)  # hardlinks to the verified blobs
        try:
            reshard_all(model)
            trainable = set(index["trainable"])
            state: dict[str, Any] = {}
            if "model" in parts:
                state["model"] = {k: v for k, v in get_model_state_dict(model).items() if k in trainable}
            want_optim = "optimizer" in parts and optimizer is not None
            optim_json = None
            if want_optim and "optimizer" in index["components"]:
                state["optim"], _ = _split_optimizer_state(get_optimizer_state_dict(model, optimizer))
                optim_json = join_tensors(json.loads(Path(files["optimizer/state.json"]).read_text("utf-8")), {})
            if state:
                dcp.load(state, checkpoint_id=str(target / SHARD_DIR))
            if "model" in state:
                set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
            if optim_json is not None:
                set_optimizer_state_dict(model, optimizer, _join_optimizer_state(state["optim"], optim_json))
            elif want_optim and "optimizer_empty" in index["components"]:
                optimizer.state.clear()  # the snapshot was taken before the first step: a fresh optimizer
            if "scheduler" in parts and scheduler is not None and "scheduler" in index["components"]:
                scheduler.load_state_dict(load_component(files, "scheduler"))
            if restore_rng and f"rng/rank{dist.rank}/state.json" in files:
                set_rng_state(load_component(files, f"rng/rank{dist.rank}"))
        finally:
            shutil.rmtree(target, ignore_errors=True)
        dist.barrier()


# ----------------------------------------------------------------------------- export


def gather_and_unshard(model: Any, dist: Any) -> None:
    """Gather the full state dict on the main process and make its model a plain module again
    (the other processes keep their sharded model: they write nothing after the loop)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule, fully_shard

    reshard_all(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dist.barrier()
    if not dist.is_main:
        return
    replaced: dict[int, torch.nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        new = replaced.get(id(param))
        if new is None:
            if name not in full:
                raise PlanError(f"The gathered state dict has no {name}; cannot export the sharded model.")
            new = torch.nn.Parameter(full[name].detach().clone(), requires_grad=param.requires_grad)
            replaced[id(param)] = new
        owner._parameters[leaf] = new
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = fully_shard.state(module)
        with contextlib.suppress(Exception):
            state._pre_forward_hook_handle.remove()
            state._post_forward_hook_handle.remove()
        for group in getattr(state, "_fsdp_param_groups", []) or []:
            for handles in (group._module_to_pre_save_state_dict_hook_handle,
                            group._module_to_pre_load_state_dict_hook_handle):
                for handle in handles.values():
                    handle.remove()
                handles.clear()
        module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule)
                                and c is not FSDPModule)
    base = getattr(model, "get_base_model", lambda: model)()
    base._is_distributed_loading_by_transformers = False
