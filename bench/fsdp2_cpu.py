"""Sharded (FSDP2) on CPU (issue 16): 2 gloo processes with ``training.sharding: fsdp2`` vs 1
process (and vs 2-process DDP) on the same recipe and global batch, then SIGKILL trials.

* ``one``:   1 process, 1 thread, micro-batch B (the reference curve);
* ``ddp``:   ``accelerate launch`` 2 processes, DDP (``training.sharding: none``), micro-batch B/2;
* ``fsdp2``: ``accelerate launch`` 2 processes, FSDP2 (``training.sharding: fsdp2``), micro-batch B/2.

Figures: per-step loss max relative difference vs ``one``; parameter bytes each process holds
(``dist/param_bytes_per_process``, logged by the sharded run; DDP and 1 process hold the whole
model); Trainer-side tokens/s (median of the logged intervals after the first); the size of a
mid-stage snapshot. Kill trials (``--kills N``): the fsdp2 recipe under a new run id is SIGKILLed
(launcher and both ranks) at a random logged step, or -- every other trial -- while a sharded
snapshot commit's staging folder exists (commits slowed by ``SCALER_WIZARD_FAULT_COMMIT_SLEEP``),
then resumed with ``scaler-wizard run --resume`` (2 processes) until completed; the snapshot each
resume chose must verify and the per-step losses must equal the uninterrupted fsdp2 run.

    OMP_NUM_THREADS=1 python bench/fsdp2_cpu.py               # 4x256 Llama, 12 steps at 256, 10 kills
    OMP_NUM_THREADS=1 python bench/fsdp2_cpu.py --quick       # 2x64, 6 steps at 128, 2 kills

Prints one JSON line and writes bench/results/fsdp2_cpu.json (fsdp2_cpu_quick.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
DEMO = ROOT / "src" / "scaler_wizard" / "assets"
sys.path.insert(0, str(ROOT / "bench"))

from multi_process import _model as tiny_model  # noqa: E402
from multi_process import plumbing_evaluation  # noqa: E402


def _model(path: Path, quick: bool) -> Path:
    return tiny_model(path, quick, layers=4, max_positions=128)


def _recipe(path: Path, model: Path, runs: Path, run_id: str, micro: int, sharding: str, steps: int,
            length: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "run": {"name": run_id, "run_id": run_id, "output_dir": str(runs), "seed": 3},
        "model": {"path": str(model)},
        "data": {"train": [str(DEMO / "demo_data" / "train.jsonl")]},
        "context": {"target_length": length, "schedule": [length], "method": "yarn", "gate_policy": "continue"},
        "training": {"steps_per_stage": steps, "micro_batch_size": micro, "threads": 1, "logging_steps": 1,
                     "learning_rate": 0.001, "warmup_steps": 2, "lr_scheduler": "cosine", "snapshot_every": 3,
                     "sharding": sharding},
        "scaling": {"lora": {"dropout": 0.0}},
        **plumbing_evaluation(length),
        "output": {"merge": True},
    }))
    return path


def _cmd(args: list[str], processes: int) -> list[str]:
    cmd = [str(BIN / "scaler-wizard"), "run", *args, "--self-approve"]
    if processes > 1:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", *cmd]
    return cmd


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _run(args: list[str], processes: int, cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(_cmd(args, processes), check=False, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _events(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # torn last line of a killed run
            out.append(json.loads(line))
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["value"] for e in _events(run_dir) if e["metric"] == "train/loss"}


def _figures(run_dir: Path) -> dict:
    events = _events(run_dir)
    tps = [e["value"] for e in events if e["metric"] == "train/tokens_per_s"][1:]
    per_process = [e["value"] for e in events if e["metric"] == "dist/param_bytes_per_process"]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"tokens_per_s": statistics.median(tps) if tps else None, "param_bytes_per_process": per_process[0]
            if per_process else 4 * summary["total_params"], "total_params": summary["total_params"],
            "trainable_params": summary["trainable_params"], "peak_rss_gb_main": summary.get("peak_rss_gb"),
            "export_max_abs_logit_diff": (summary.get("export_check") or {}).get("max_abs_logit_diff")}


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out += [int(child), *_descendants(int(child))]
    return out


def _kill_all(proc: subprocess.Popen) -> None:
    for pid in _descendants(proc.pid) + [proc.pid]:  # torchrun starts each rank in its own session
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)


def _kill_trial(work: Path, model: Path, runs: Path, trial: int, in_commit: bool, micro: int, steps: int,
                length: int, reference: dict[int, float], rng: random.Random) -> dict:
    from scaler_wizard.cache.checkpoints import CheckpointCache

    run_id = f"kill{trial}"
    recipe = _recipe(work / f"{run_id}.yaml", model, runs, run_id, micro, "fsdp2", steps, length)
    cache = CheckpointCache(runs / ".checkpoints")
    env = _env(SCALER_WIZARD_FAULT_COMMIT_SLEEP="0.1") if in_commit else _env()
    log = open(work / f"{run_id}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(_cmd([str(recipe)], 2), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    target = rng.randint(1, steps - 1)
    landed_in_commit, seen = False, None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if in_commit:
            # armed once 1-3 snapshots are committed; then the next commit that starts is hit
            staging = {p.name for p in (runs / ".checkpoints" / "tmp").glob(f"dcp.{run_id}.*")}
            if seen is None and len(cache.list(run_id)) >= 1 + trial % 3:
                seen = staging  # the tail of the commit that just completed does not count
            elif seen is not None and staging - seen:
                time.sleep(rng.uniform(0.0, 0.6))
                landed_in_commit = bool((staging - seen) & {p.name for p in (runs / ".checkpoints" / "tmp").glob("dcp.*")})
                break
        elif (runs / run_id / "metrics.jsonl").exists() and target in _losses(runs / run_id):
            break
        time.sleep(0.02)
    killed_alive = proc.poll() is None
    _kill_all(proc)
    steps_before = max(_losses(runs / run_id), default=0) if (runs / run_id / "metrics.jsonl").exists() else 0
    resumes, chosen_ok = 0, []
    for _ in range(3):
        status = json.loads((runs / run_id / "status.json").read_text())
        if status.get("state") == "completed":
            break
        resumes += 1
        subprocess.run(_cmd(["--resume", str(runs / run_id)], 2), check=False, cwd=work, env=_env(), stdout=log,
                              stderr=subprocess.STDOUT, timeout=1800)
        status = json.loads((runs / run_id / "status.json").read_text())
        ref = (status.get("resumes") or [{}])[-1].get("snapshot")
        if ref:
            chosen_ok.append(cache.verify(ref).ok)
    log.close()
    status = json.loads((runs / run_id / "status.json").read_text())
    got = _losses(runs / run_id)
    max_rel = max((abs(got[s] - reference[s]) / abs(reference[s]) for s in reference if s in got), default=None)
    return {"trial": trial, "aimed_in_commit": in_commit, "landed_in_commit": landed_in_commit,
            "killed_while_running": killed_alive, "last_step_logged_before_kill": steps_before,
            "resumes": resumes, "completed": status.get("state") == "completed",
            "chosen_snapshots_verified": chosen_ok, "same_steps": sorted(got) == sorted(reference),
            "loss_max_rel_diff_vs_uninterrupted": max_rel,
            "every_snapshot_verifies": all(cache.verify(s).ok for s in cache.list(run_id))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kills", type=int, default=None)
    ap.add_argument("--kills-only", action="store_true", help="only the fsdp2 reference run and the kill trials")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    steps, length, micro = (6, 128, 4) if args.quick else (12, 256, 4)
    kills = args.kills if args.kills is not None else (2 if args.quick else 10)
    load_before = os.getloadavg()
    rng = random.Random(16)
    with tempfile.TemporaryDirectory(prefix="sw-fsdp2-") as tmp:
        work = Path(tmp)
        model = _model(work / "model", args.quick)
        runs = work / "runs"
        out = {}
        plans = (("one", 1, micro, "none"), ("ddp", 2, micro // 2, "none"), ("fsdp2", 2, micro // 2, "fsdp2"))
        for name, procs, mb, sharding in plans[2:] if args.kills_only else plans:
            recipe = _recipe(work / f"{name}.yaml", model, runs, name, mb, sharding, steps, length)
            wall = _run([str(recipe)], procs, work)
            out[name] = {**_figures(runs / name), "wall_s": round(wall, 1), "processes": procs, "micro_batch": mb,
                         "losses": _losses(runs / name)}
        from scaler_wizard.cache.checkpoints import CheckpointCache

        cache = CheckpointCache(runs / ".checkpoints")
        for name, figures in out.items():
            mid = [s for s in cache.list(name) if s.phase == "train"]
            figures["mid_stage_snapshot_bytes"] = mid[0].logical_bytes if mid else None
            figures["snapshots"] = len(cache.list(name))
        trials = [_kill_trial(work, model, runs, i, i % 2 == 0, micro // 2, steps, length, out["fsdp2"]["losses"], rng)
                  for i in range(kills)]
    ref = out.get("one", out["fsdp2"])["losses"]
    rel = {name: max(abs(out[name]["losses"][s] - ref[s]) / abs(ref[s]) for s in ref) for name in ("ddp", "fsdp2")
           if name in out}
    for v in out.values():
        v.pop("losses")
    whole = 4 * out["fsdp2"]["total_params"]
    result = {
        "bench": "fsdp2_cpu", "mode": "quick" if args.quick else "full",
        "command": "OMP_NUM_THREADS=1 python bench/fsdp2_cpu.py" + (" --quick" if args.quick else "")
        + (" --kills-only" if args.kills_only else ""),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "steps": steps, "seq": length, "global_batch": micro, "runs": out,
        "loss_max_rel_diff_vs_one_process": rel,
        "param_bytes_per_process_fsdp2_over_whole": out["fsdp2"]["param_bytes_per_process"] / whole,
        "kills": {"trials": trials, "n": len(trials),
                  "landed_in_commit": sum(t["landed_in_commit"] for t in trials),
                  "completed": sum(t["completed"] for t in trials),
                  "corrupt_snapshots_chosen": sum(not ok for t in trials for ok in t["chosen_snapshots_verified"]),
                  "max_loss_rel_diff": max((t["loss_max_rel_diff_vs_uninterrupted"] or 0.0 for t in trials),
                                           default=None)},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    name = "fsdp2_cpu" + ("_quick" if args.quick else "") + ("_kills" if args.kills_only else "")
    target = args.out or RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
