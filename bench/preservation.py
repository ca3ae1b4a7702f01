"""Knowledge preservation (issue 4) on the demo scaling run, with and without distillation, same
budget: short-context (256) perplexity change vs base, KL(base || scaled) at 256 tokens, passkey
and perplexity at the target; peak memory and throughput of each mode. Every mode runs for
``--seeds`` seeds (``run.seed`` = the demo's seed + 0, 1, 2, ...: adapter initialisation, data
order and replay rows change; the probes' trials do not) and is reported as median and
mean +- std over the seeds.

Each (mode, seed) runs the real pipeline in its own subprocess (peak RSS is per process). The
demo recipe ships with distillation on (teacher ``base``, kd_weight 0.5) and replay; every mode
sets both explicitly, so ``none`` is not "the recipe as shipped":

  none     no distillation, no replay
  replay   replay rows of base-length data (``--replay-ratio``, default the demo's), no KD:
           isolates replay from KD
  base     replay + KD from the student's own frozen base (adapters off, original RoPE), kd_weight
           the demo's: the demo recipe as shipped
  model    replay + KD from a separately loaded copy of the base model (a second copy in memory)
  offline  replay + KD from a precomputed top-k cache (no teacher in memory)

Every mode uses the same budget and ``gate_policy: continue`` (no gate extension), so their
quality figures are comparable: ``--steps N`` per stage (default 12, a reduced budget), or
``--full-budget`` for the demo's own ``training.steps_per_stage``.

    python bench/preservation.py                          # none, replay, base; 3 seeds; 12 steps/stage
    python bench/preservation.py --full-budget            # the same at the demo's budget (50, 60)
    python bench/preservation.py --modes model,offline --merge-into   # memory/throughput of the others
    python bench/preservation.py --quick                  # smoke: 2 steps per stage, 1 seed, few trials

Prints one JSON line and writes bench/results/preservation.json (preservation_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results"
MODES = ("none", "replay", "base", "model", "offline")
METRICS = ("short_context_ppl_change_pct", "kl_to_base_per_token@256", "passkey@1024", "perplexity@1024",
           "peak_rss_gb_run", "tokens_per_s_mean", "wall_time_s")


def demo_recipe():
    from scaler_wizard.recipe import load_recipe

    return load_recipe(ROOT / "src" / "scaler_wizard" / "recipes" / "demo.yaml")[0]


def child(mode: str, a: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from scaler_wizard.pipeline import run
    from scaler_wizard.recipe import resolve_path
    from scaler_wizard.run_record import peak_rss_gb

    quick, steps, seed = a["quick"], a["steps"], a["seed"]

    def override(recipe):
        r = recipe.model_copy(deep=True)
        r.run.output_dir = a["runs"]
        r.run.name = f"preserve-{mode}-s{seed}"
        r.run.seed = seed
        if steps:
            r.training.steps_per_stage = steps
        if quick:
            r.evaluation.passkey.trials = 5
            r.evaluation.perplexity.windows = 2
        r.evaluation.evaluate_base_at = [256]
        r.context.gate_policy = "continue"  # same budget for every mode: no gate extension
        r.training.threads = a["threads"]
        d = r.distillation
        # every field set explicitly: the demo recipe ships with distillation and replay on
        d.replay_ratio = 0.0 if mode == "none" else a["replay_ratio"]
        if mode in ("none", "replay"):
            d.enabled = False
        else:
            # sources first: the section re-validates on every assignment
            if mode == "model":
                d.teacher_path = str(resolve_path(r.model.path))
            if mode == "offline":
                d.cache = a["cache"]
            d.teacher = mode
            d.kd_weight = a["kd_weight"]
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
    from transformers import AutoTokenizer

    from scaler_wizard.data import load_texts, token_stream

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
        "seed": seed,
        "steps_per_stage": steps,
        "replay_ratio": 0.0 if mode == "none" else a["replay_ratio"],
        "kd_weight": a["kd_weight"] if mode in ("base", "model", "offline") else 0.0,
        "short_context_ppl_change_pct": head["short_context_ppl_change_pct@256"],
        "kl_to_base_per_token@256": kl_sum / n,
        "passkey@1024": head["passkey@1024"],
        "perplexity@1024": head["perplexity@1024"],
        "peak_rss_gb_run": round(peak_train, 3),
        "tokens_per_s_mean": sum(tps) / len(tps) if tps else math.nan,
        "wall_time_s": s["wall_time_s"],
    }


def build_offline_cache(cache_dir: Path, quick: bool, env: dict) -> float:
    t0 = time.time()
    from scaler_wizard.recipe import resolve_path

    cmd = [sys.executable, "-m", "scaler_wizard", "distill", "cache", str(resolve_path("builtin:demo")),
           str(ROOT / "src/scaler_wizard/assets/demo_data/train.jsonl"), "-o", str(cache_dir), "--length", "256",
           "--k", "32", "--max-rows", "64" if quick else "512"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return time.time() - t0


def spread(values: list[float]) -> dict:
    """median, mean, sample std (None for one value) and the values, over the seeds."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"n": len(vals), "median": statistics.median(vals), "mean": statistics.fmean(vals), "std": std,
            "shown": f"{statistics.fmean(vals):.4g} +- {std:.2g}" if std is not None else f"{vals[0]:.4g}",
            "values": vals}


def summarise(rows: list[dict]) -> tuple[dict, dict]:
    ok = [r for r in rows if "error" not in r]
    summary = {}
    for mode in MODES:
        mine = [r for r in ok if r["mode"] == mode]
        if mine:
            summary[mode] = {"seeds": sorted(r["seed"] for r in mine), **{m: spread([r[m] for r in mine])
                                                                          for m in METRICS}}
    derived = {}
    by_seed = {(r["mode"], r["seed"]): r for r in ok}
    for mode in ("replay", "base", "model", "offline"):
        pairs = [(by_seed[(mode, s)], by_seed[("none", s)]) for (m, s) in by_seed if m == mode and ("none", s) in by_seed]
        if not pairs:
            continue
        # per seed, paired with none of the same seed (same adapter init and data order)
        derived[f"{mode}_minus_none"] = {
            "short_context_ppl_change_pct_points": spread([a["short_context_ppl_change_pct"]
                                                           - b["short_context_ppl_change_pct"] for a, b in pairs]),
            "kl_to_base_ratio": spread([a["kl_to_base_per_token@256"] / b["kl_to_base_per_token@256"]
                                        for a, b in pairs if b["kl_to_base_per_token@256"]]),
            "passkey_points": spread([100 * (a["passkey@1024"] - b["passkey@1024"]) for a, b in pairs]),
        }
    return summary, derived


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke mode: 2 steps per stage, 1 seed, few trials")
    ap.add_argument("--modes", default="none,replay,base", help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per mode (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=12, help="steps per stage for every mode (default 12)")
    ap.add_argument("--full-budget", action="store_true",
                    help="the demo recipe's own training.steps_per_stage for every mode (overrides --steps)")
    ap.add_argument("--replay-ratio", type=float, default=None, help="replay share (default: the demo recipe's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--merge-into", action="store_true",
                    help="add these modes' rows to the existing results file instead of replacing it")
    ap.add_argument("--output", type=Path, default=None, help="results file (default bench/results/preservation.json)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        out = child(args.child, json.loads(args.child_args))
        print("RESULT " + json.dumps(out), flush=True)
        return

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    demo = demo_recipe()
    n_seeds = args.seeds or (1 if args.quick else 3)
    seeds = [demo.run.seed + k for k in range(n_seeds)]
    if args.quick:
        steps = [2, 2]
    elif args.full_budget:
        steps = None  # the recipe's own
    else:
        steps = [args.steps] * len(demo.training.steps_per_stage)
    budget = steps or list(demo.training.steps_per_stage)
    replay_ratio = demo.distillation.replay_ratio if args.replay_ratio is None else args.replay_ratio
    kd_weight = demo.distillation.kd_weight
    command = "python " + " ".join(["bench/preservation.py"] + sys.argv[1:])
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, SCALER_WIZARD_HOME=str(Path(tmp) / "home"), OMP_NUM_THREADS=str(args.threads))
        cache_dir = Path(tmp) / "offline-cache"
        cache_build_s = build_offline_cache(cache_dir, args.quick, env) if "offline" in modes else None
        # seed-major order: each seed's modes run back to back, so slow periods of this shared
        # machine spread over the modes instead of landing on one
        for seed in seeds:
            for mode in modes:
                payload = json.dumps({"steps": steps, "quick": args.quick, "runs": str(Path(tmp) / "runs"),
                                      "cache": str(cache_dir) if mode == "offline" else None, "seed": seed,
                                      "replay_ratio": replay_ratio, "kd_weight": kd_weight, "threads": args.threads})
                proc = subprocess.run([sys.executable, __file__, "--child", mode, "--child-args", payload],
                                      capture_output=True, text=True, env=env, cwd=ROOT, check=False)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    rows.append({"mode": mode, "seed": seed, "error": proc.stderr[-2000:]})
                else:
                    rows.append(json.loads(line[0][len("RESULT "):]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out_file = args.output or RESULTS / ("preservation_quick.json" if args.quick else "preservation.json")
    if args.merge_into and out_file.exists():
        previous = json.loads(out_file.read_text())
        rows = [r for r in previous["rows"] if r["mode"] not in modes] + rows
        cache_build_s = cache_build_s or previous.get("offline_cache_build_s")
    summary, derived = summarise(rows)
    result = {"bench": "preservation", "mode": "quick" if args.quick else "full", "command": command,
              "steps_per_stage": budget, "full_budget": bool(args.full_budget), "seeds": seeds,
              "replay_ratio": replay_ratio, "kd_weight": kd_weight, "threads": args.threads,
              "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - t0, 1),
              "offline_cache_build_s": cache_build_s, "summary": summary, "derived": derived, "rows": rows,
              "errors": sum(1 for r in rows if "error" in r)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
