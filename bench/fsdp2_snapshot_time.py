"""Sharded snapshot save/restore time vs the full-state snapshot of the same model (issue 16).

The same Llama (random weights; every parameter trainable, AdamW after one step, so a snapshot
holds the weights and both Adam moments) is snapshotted into a fresh checkpoint cache:

* ``full``: 1 process, ``cache/state.py`` ``save_snapshot`` / ``load_snapshot`` (safetensors +
  JSON, the DDP and single-process path);
* ``sharded``: 2 gloo processes under ``torchrun``, FSDP2 (``training/sharded.py``):
  ``ShardedCheckpoints.commit`` / ``load`` (DCP shards in the cache's commit protocol).

Each save follows one optimizer step (new bytes: nothing is deduplicated); times are the median
of ``--reps`` saves and loads (wall clock, including hashing, fsyncs, and for the sharded path the
collectives and the per-rank verification).

    OMP_NUM_THREADS=1 python bench/fsdp2_snapshot_time.py            # 8 x 512 Llama (~30 M parameters)
    OMP_NUM_THREADS=1 python bench/fsdp2_snapshot_time.py --quick    # 2 x 128

Prints one JSON line and writes bench/results/fsdp2_snapshot_time.json (…_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def build(model_dir: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(model_dir)


def _model_and_optimizer(model_dir: Path, sharded_dist=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if sharded_dist is not None:
        from scaler_wizard.training.sharded import shard_model

        shard_model(model, sharded_dist.world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


def _step(model, optimizer, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4096, (2, 64), generator=g)
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_full(model_dir: Path, cache_root: Path, reps: int) -> dict:
    from scaler_wizard.cache.checkpoints import CheckpointCache
    from scaler_wizard.cache.state import load_snapshot, save_snapshot

    model, optimizer = _model_and_optimizer(model_dir)
    cache = CheckpointCache(cache_root)
    saves, loads, snap = [], [], None
    for i in range(reps):
        _step(model, optimizer, i)
        t0 = time.perf_counter()
        snap = save_snapshot(cache, "full", step=i + 1, model=model, optimizer=optimizer)
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        load_snapshot(cache, snap, model=model, optimizer=optimizer, restore_rng=False)
        loads.append(time.perf_counter() - t0)
    return {"save_s": statistics.median(saves), "load_s": statistics.median(loads), "snapshot_bytes": snap.logical_bytes,
            "params": sum(p.numel() for p in model.parameters())}


def worker(model_dir: Path, cache_root: Path, reps: int, out: Path) -> None:
    from scaler_wizard.cache.checkpoints import CheckpointCache
    from scaler_wizard.distributed import Dist
    from scaler_wizard.training.sharded import ShardedCheckpoints, local_parameter_bytes

    dist = Dist.from_env()
    model, optimizer = _model_and_optimizer(model_dir, sharded_dist=dist)
    ckpt = ShardedCheckpoints(CheckpointCache(cache_root), "sharded", dist)
    saves, loads, snap = [], [], None
    for i in range(reps):
        _step(model, optimizer, i)
        dist.barrier()
        t0 = time.perf_counter()
        snap = ckpt.commit(model, i + 1, 0, pinned=False, optimizer=optimizer)
        saves.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        ckpt.load(model, snap, optimizer=optimizer, parts=("model", "optimizer"))
        loads.append(time.perf_counter() - t0)
    if dist.is_main:
        out.write_text(json.dumps({"save_s": statistics.median(saves), "load_s": statistics.median(loads),
                                   "snapshot_bytes": snap.logical_bytes, "processes": dist.world_size,
                                   "param_bytes_per_process": local_parameter_bytes(model)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "CACHE"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.reps, args.worker_out)
        return
    hidden, layers = (128, 2) if args.quick else (512, 8)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sw-fsdp2-snap-") as tmp:
        work = Path(tmp)
        build(work / "model", hidden, layers)
        full = run_full(work / "model", work / "cache_full", args.reps)
        out = work / "sharded.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), "--reps", str(args.reps), "--worker", str(work / "model"),
               str(work / "cache_sharded"), "--worker-out", str(out)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"sharded worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        sharded = json.loads(out.read_text())
    result = {"bench": "fsdp2_snapshot_time", "mode": "quick" if args.quick else "full",
              "command": "OMP_NUM_THREADS=1 python bench/fsdp2_snapshot_time.py" + (" --quick" if args.quick else ""),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
              "model": {"hidden": hidden, "layers": layers, "params": full["params"]}, "reps": args.reps,
              "full_1_process": full, "sharded_2_processes": sharded,
              "save_ratio_sharded_over_full": sharded["save_s"] / full["save_s"],
              "load_ratio_sharded_over_full": sharded["load_s"] / full["load_s"],
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    target = args.out or RESULTS / ("fsdp2_snapshot_time_quick.json" if args.quick else "fsdp2_snapshot_time.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
