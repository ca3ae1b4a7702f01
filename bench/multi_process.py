"""2-process vs 1-process throughput of the same recipe on CPU (issue 9).

The same recipe, model and data, run three ways one after the other on this machine:

* ``one_proc_all_threads``: 1 process, ``training.threads`` = all cores, micro-batch B;
* ``one_proc_one_thread``:  1 process, 1 thread, micro-batch B (the per-process unit of the next);
* ``two_proc``: ``accelerate launch`` with 2 processes (DDP over gloo), 1 thread each,
  micro-batch B/2 each -- the same global batch, so the same loss curve.

Throughput is the Trainer-side ``train/tokens_per_s`` the pipeline logs (tokens of the stage
rows per second of training, probes excluded), median over the logged intervals after the
first (warm-up). The loss curves are compared too (max relative difference per step).

    OMP_NUM_THREADS=1 python bench/multi_process.py            # full: 60 steps at 512 tokens
    OMP_NUM_THREADS=1 python bench/multi_process.py --quick    # smoke: 6 steps at 128 tokens

Prints one JSON line and writes bench/results/multi_process.json (multi_process_quick.json).
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
BIN = Path(sys.executable).parent
DEMO = ROOT / "src" / "scaler_wizard" / "assets"


def _model(path: Path, quick: bool, *, layers: int = 6, max_positions: int = 256) -> Path:
    """A random Llama with the demo tokenizer (2x64 in quick mode); bench/fsdp2_cpu.py uses it too."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(DEMO / "demo_model"))
    torch.manual_seed(0)
    hidden = 64 if quick else 256
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=2 if quick else layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64 if quick else max_positions, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def plumbing_evaluation(length: int) -> dict:
    """The evaluation and safety sections of a bench whose subject is speed or resume, not
    quality: perplexity only, and gates plus the envelope's evaluation rules kept out of the way
    of its random model (a real run would fail them and end with exit 5)."""
    return {
        "evaluation": {"passkey": {"enabled": False}, "perplexity": {"windows": 1, "max_ratio_to_base": 1000.0},
                       "short_context": {"enabled": False}, "evaluate_base_at": [length]},
        "safety": {"evaluation": {"perplexity_warn_ratio": None, "perplexity_stop_ratio": None,
                                  "short_context_warn_pct": None, "short_context_stop_pct": None}},
    }


def _recipe(path: Path, model: Path, runs: Path, run_id: str, micro: int, threads: int, steps: int,
            length: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "run": {"name": run_id, "run_id": run_id, "output_dir": str(runs), "seed": 3},
        "model": {"path": str(model)},
        "data": {"train": [str(DEMO / "demo_data" / "train.jsonl")]},
        "context": {"target_length": length, "schedule": [length], "method": "yarn", "gate_policy": "continue"},
        "training": {"steps_per_stage": steps, "micro_batch_size": micro, "threads": threads, "logging_steps": 2,
                     "learning_rate": 0.001, "warmup_steps": 0, "lr_scheduler": "constant", "snapshot_every": 0},
        **plumbing_evaluation(length),
        "output": {"merge": False},
    }))
    return path


def _run(recipe: Path, processes: int, cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = str(BIN / "scaler-wizard")
    cmd = [cli, "run", str(recipe), "--self-approve"]
    if processes > 1:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _figures(run_dir: Path) -> dict:
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [e["value"] for e in events if e["metric"] == "train/tokens_per_s"]
    losses = {e["step"]: e["value"] for e in events if e["metric"] == "train/loss"}
    timed = tps[1:] or tps
    return {"tokens_per_s": statistics.median(timed), "intervals": len(timed), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    steps, length, micro = (6, 128, 2) if args.quick else (60, 512, 4)
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sw-mp-") as tmp:
        work = Path(tmp)
        model = _model(work / "model", args.quick)
        runs = work / "runs"
        plans = {
            "one_proc_all_threads": (micro, cores, 1),
            "one_proc_one_thread": (micro, 1, 1),
            "two_proc": (micro // 2, 1, 2),
        }
        out = {}
        for name, (mb, threads, procs) in plans.items():
            recipe = _recipe(work / f"{name}.yaml", model, runs, name, mb, threads, steps, length)
            wall = _run(recipe, procs, work)
            out[name] = {**_figures(runs / name), "wall_s": round(wall, 1), "processes": procs,
                         "threads_per_process": threads, "micro_batch": mb}
    ref, two = out["one_proc_all_threads"]["losses"], out["two_proc"]["losses"]
    max_rel = max(abs(two[s] - ref[s]) / abs(ref[s]) for s in ref)
    for v in out.values():
        v.pop("losses")
    result = {
        "bench": "multi_process",
        "mode": "quick" if args.quick else "full",
        "command": "OMP_NUM_THREADS=1 python bench/multi_process.py" + (" --quick" if args.quick else ""),
        "machine": {"platform": platform.platform(), "cpu_count": cores, "python": platform.python_version()},
        "steps": steps, "seq": length, "global_batch": micro,
        "runs": out,
        "ratio_two_proc_vs_one_proc_all_threads": out["two_proc"]["tokens_per_s"]
        / out["one_proc_all_threads"]["tokens_per_s"],
        "ratio_two_proc_vs_one_proc_one_thread": out["two_proc"]["tokens_per_s"]
        / out["one_proc_one_thread"]["tokens_per_s"],
        "loss_curve_max_rel_diff": max_rel,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    target = args.out or RESULTS / ("multi_process_quick.json" if args.quick else "multi_process.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
