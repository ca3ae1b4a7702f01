"""Knowledge preservation (issue 4) on the demo scaling run, with and without distillation,
same budget: short-context (256) perplexity change vs base, KL(base || scaled) at 256 tokens,
passkey at the target; peak memory and throughput of each teacher mode.

Each configuration runs the real pipeline in its own subprocess (peak RSS is per process):

  none     the demo recipe as shipped (no distillation, no replay)
  replay   25% replay rows of base-length data, no KD (isolates replay from KD)
  base     replay + KD from the student's own frozen base (adapters off, original RoPE)
  model    replay + KD from a separately loaded copy of the base model (a second copy in memory)
  offline  replay + KD from a precomputed top-k cache (no teacher in memory)

    python bench/preservation.py                       # none, replay, base at the full demo budget;
                                                       # model and offline at --memory-steps per stage
    python bench/preservation.py --quick               # smoke: 2 steps per stage, few trials

Prints one JSON line and writes bench/results/preservation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results"


def child(mode: str, steps: list[int] | None, quick: bool, runs_dir: Path, cache_dir: Path | None) -> dict:
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from scaler_wizard.pipeline import run
    from scaler_wizard.run_record import peak_rss_gb
    from scaler_wizard.recipe import resolve_path

    def override(recipe):
        r = recipe.model_copy(deep=True)
        r.run.output_dir = str(runs_dir)
        r.run.name = f"preserve-{mode}"
        if steps:
            r.training.steps_per_stage = steps
        if quick:
            r.evaluation.passkey.trials = 5
            r.evaluation.perplexity.windows = 2
        r.evaluation.evaluate_base_at = [256]
        r.context.gate_policy = "continue"  # same budget for every mode: no gate extension
        r.training.threads = int(os.environ.get("BENCH_THREADS", "0")) or None
        d = r.distillation
        if mode != "none":
            d.replay_ratio = 0.25
        if mode in ("base", "model", "offline"):
            # sources first: the section re-validates on every assignment
            if mode == "model":
                d.teacher_path = str(resolve_path(r.model.path))
            if mode == "offline":
                d.cache = str(cache_dir)
            d.teacher = mode
            d.kd_weight = 0.5
            d.enabled = True
        return r

    result = run(None, recipe_overrides=override, self_approve=True)
    peak_train = peak_rss_gb()
    s = result.summary
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [e["value"] for e in events if e["metric"] == "train/tokens_per_s" and e.get("value")]

    # KL(base || scaled) per token on held-out 256-token windows (the knowledge we want kept)
    base = AutoModelForCausalLM.from_pretrained(resolve_path("builtin:demo"), dtype=torch.float32).eval()
    scaled = AutoModelForCausalLM.from_pretrained(result.run_dir / "model", dtype=torch.float32).eval()
    from scaler_wizard.data import load_texts, token_stream
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path("builtin:demo"))
    tok.model_max_length = int(1e12)
    stream = token_stream(tok, load_texts([resolve_path("builtin:demo/heldout.jsonl")], "text"))
    windows = 4 if quick else 32
    kl_sum, n = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            ids = torch.tensor([stream[w * 256 : (w + 1) * 256]])
            p = torch.log_softmax(base(input_ids=ids).logits.float(), -1)
            q = torch.log_softmax(scaled(input_ids=ids).logits.float(), -1)
            kl_sum += (p.exp() * (p - q)).sum().item()
            n += ids.numel()
    head = s["headline"]
    return {
        "mode": mode,
        "steps_per_stage": steps,
        "short_context_ppl_change_pct": head["short_context_ppl_change_pct@256"],
        "kl_to_base_per_token@256": kl_sum / n,
        "passkey@1024": head["passkey@1024"],
        "perplexity@1024": head["perplexity@1024"],
        "peak_rss_gb_run": round(peak_train, 3),
        "tokens_per_s_mean": sum(tps) / len(tps) if tps else math.nan,
        "wall_time_s": s["wall_time_s"],
    }


def build_offline_cache(cache_dir: Path, quick: bool) -> float:
    t0 = time.time()
    from scaler_wizard.recipe import resolve_path

    cmd = [sys.executable, "-m", "scaler_wizard", "distill", "cache", str(resolve_path("builtin:demo")),
           str(ROOT / "src/scaler_wizard/assets/demo_data/train.jsonl"), "-o", str(cache_dir), "--length", "256",
           "--k", "32", "--max-rows", "64" if quick else "512"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--modes", default="none,replay,base,model,offline")
    ap.add_argument("--memory-steps", type=int, default=20, help="steps per stage for the model/offline runs")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per stage for EVERY mode (a reduced, equal budget; default: the demo's)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--merge-into", action="store_true",
                    help="add these modes' rows to the existing results file instead of replacing it")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        a = json.loads(args.child_args)
        out = child(args.child, a["steps"], a["quick"], Path(a["runs"]), Path(a["cache"]) if a["cache"] else None)
        print("RESULT " + json.dumps(out), flush=True)
        return

    modes = args.modes.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, SCALER_WIZARD_HOME=str(Path(tmp) / "home"))
        cache_dir = Path(tmp) / "offline-cache"
        cache_build_s = None
        if "offline" in modes:
            os.environ["SCALER_WIZARD_HOME"] = env["SCALER_WIZARD_HOME"]
            cache_build_s = build_offline_cache(cache_dir, args.quick)
        for mode in modes:
            full_budget = mode in ("none", "replay", "base")
            if args.quick:
                steps = [2, 2]
            elif args.steps:
                steps = [args.steps, args.steps]
            else:
                steps = None if full_budget else [args.memory_steps, args.memory_steps]
            payload = json.dumps({"steps": steps, "quick": args.quick, "runs": str(Path(tmp) / "runs"),
                                  "cache": str(cache_dir) if mode == "offline" else None})
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--child-args", payload],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                rows.append({"mode": mode, "error": proc.stderr[-2000:]})
            else:
                rows.append(json.loads(line[0][len("RESULT "):]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out_file = RESULTS / ("preservation_quick.json" if args.quick else "preservation.json")
    if args.merge_into and out_file.exists():
        previous = json.loads(out_file.read_text())
        rows = [r for r in previous["rows"] if r["mode"] not in modes] + rows
        cache_build_s = cache_build_s or previous.get("offline_cache_build_s")
    by = {r["mode"]: r for r in rows}
    derived = {}
    if "none" in by and "base" in by and "error" not in by["none"] and "error" not in by["base"]:
        none, base = by["none"], by["base"]
        derived["regression_ratio_base_vs_none"] = (
            base["short_context_ppl_change_pct"] / none["short_context_ppl_change_pct"]
            if none["short_context_ppl_change_pct"] else None
        )
        derived["passkey_points_base_minus_none"] = 100 * (base["passkey@1024"] - none["passkey@1024"])
    result = {"bench": "preservation", "quick": args.quick, "offline_cache_build_s": cache_build_s,
              "rows": rows, "derived": derived,
              "note": "none/replay/base at the demo budget; model/offline at --memory-steps per stage (memory and "
                      "throughput only; their quality figures are not comparable)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
