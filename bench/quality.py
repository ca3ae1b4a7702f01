"""Scaling quality of the demo through the product itself (issue 13).

Every configuration is one `pipeline.run` of the demo recipe (the embedded model, 256 -> 1024)
in a fresh subprocess (its own peak RSS), self-approved, with one override:

* ``seed<N>``: the demo recipe as shipped with ``run.seed = N`` (the demo's figures as mean ± std
  over seeds);
* ``lora`` / ``lora_norms_emb``: the adapters alone vs adapters plus trainable norms and input
  embeddings (LongLoRA, Chen et al. 2023: PEFT ``modules_to_save``), at the demo's step budget;
* ``yarn`` / ``linear`` / ``ntk``: the position-encoding method at the demo's step budget;
* ``lora_r64`` / ``lora_lr5e-4`` / ``lora_r64_lne_lr5e-4``: LoRA with 4x the rank, or 2.5x the
  learning rate, or both with trainable norms and embeddings;

* ``full`` / ``full_lr5e-5``: full fine-tuning (``scaling.strategy: full``) at the demo's step
  budget, at the demo's learning rate and at a quarter of it; its teacher is the base model
  folder (``distillation.teacher: model``), since the base teacher would need a second copy.

Figures per run, read from its ``summary.json``: verdict, the length reached, passkey at 1024 on
the probe's template (mean and worst depth) and on the held-out template, passkey at 256 before
and after, perplexity at 1024 against the base at 256, the short-context (256) perplexity change,
wall time and peak RSS.

    OMP_NUM_THREADS=2 python bench/quality.py --configs seed1234 seed1235 seed1236
    python bench/quality.py --configs lora lora_norms_emb yarn linear ntk full full_lr5e-5
Results: bench/results/quality.json (every run appended by configuration name; the table of
means ± std over the ``seed*`` runs is printed and stored under ``"demo_over_seeds"``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "quality.json"

# LongLoRA's trainable norms and input embeddings (PEFT modules_to_save)
NORMS_EMB = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]
CONFIGS = {
    "lora": {},
    "lora_norms_emb": {"scaling.lora.modules_to_save": NORMS_EMB},
    "yarn": {},
    "linear": {"context.method": "linear", "context.method_params": {}},
    "ntk": {"context.method": "ntk", "context.method_params": {}},
    # more LoRA capacity or a larger step at the same budget: does LoRA close the gap to full
    # fine-tuning on the held-out needle wording?
    "lora_r64": {"scaling.lora.rank": 64, "scaling.lora.alpha": 128},
    "lora_lr5e-4": {"training.learning_rate": 5e-4},
    "lora_lne_lr5e-4": {"training.learning_rate": 5e-4,
                        "scaling.lora.modules_to_save": NORMS_EMB},
    "lora_r32_lne_lr5e-4": {"scaling.lora.rank": 32, "scaling.lora.alpha": 64, "training.learning_rate": 5e-4,
                            "scaling.lora.modules_to_save": NORMS_EMB},
    "lora_r64_lne_lr5e-4": {"scaling.lora.rank": 64, "scaling.lora.alpha": 128, "training.learning_rate": 5e-4,
                            "scaling.lora.modules_to_save": NORMS_EMB},
    # full fine-tuning at the demo's budget: the base teacher would be a second copy of the
    # weights, so the teacher is the base model folder itself (distillation.teacher: model)
    "full": {"scaling.strategy": "full", "distillation.teacher": "model",
             "distillation.teacher_path": str(ROOT / "src" / "scaler_wizard" / "assets" / "demo_model")},
    "full_lr5e-5": {"scaling.strategy": "full", "distillation.teacher": "model",
                    "distillation.teacher_path": str(ROOT / "src" / "scaler_wizard" / "assets" / "demo_model"),
                    "training.learning_rate": 5e-5},
}


def overrides_for(name: str) -> dict:
    if name.startswith("seed"):
        return {"run.seed": int(name[4:])}
    if name not in CONFIGS:
        raise SystemExit(f"unknown configuration {name!r}; known: seed<N>, {', '.join(CONFIGS)}")
    return CONFIGS[name]


def child(name: str, out_dir: str) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from scaler_wizard.pipeline import run

    overrides = {**overrides_for(name), "run.output_dir": out_dir, "run.name": f"quality-{name}"}

    def apply(recipe):
        data = recipe.model_dump()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return type(recipe).model_validate(data)

    t0 = time.perf_counter()
    result = run(None, recipe_overrides=apply, self_approve=True)
    s = result.summary
    return figures(name, s, time.perf_counter() - t0)


def figures(name: str, s: dict, seconds: float) -> dict:
    base, final = s.get("base") or {}, s.get("final") or {}
    target, base_len = s["target_length"], s["base_length"]
    by_depth = (s.get("passkey_by_depth") or {}).get(str(target)) or {}
    depth_values = list(by_depth.values()) if isinstance(by_depth, dict) else list(by_depth or [])
    ppl_short_base, ppl_short = base.get(f"perplexity@{base_len}"), final.get(f"perplexity@{base_len}")
    return {
        "config": name,
        "verdict": s.get("verdict"),
        "reached_length": s.get("reached_length"),
        f"passkey@{target}": final.get(f"passkey@{target}"),
        f"passkey@{target}_min_depth": min(depth_values) if depth_values else None,
        f"passkey_heldout_template@{target}": final.get(f"passkey_heldout_template@{target}"),
        f"base_passkey@{base_len}": base.get(f"passkey@{base_len}"),
        f"passkey@{base_len}": final.get(f"passkey@{base_len}"),
        f"perplexity@{target}": final.get(f"perplexity@{target}"),
        f"base_perplexity@{base_len}": ppl_short_base,
        f"short_perplexity_change_pct@{base_len}": (100 * (ppl_short / ppl_short_base - 1)
                                                    if ppl_short and ppl_short_base else None),
        "total_steps": s.get("total_steps"),
        "wall_time_s": round(seconds, 1),
        "peak_rss_gb": s.get("peak_rss_gb"),
        # which gate ended each stage attempt: the "why" of a gates_failed verdict
        "stages": [{"length": st.get("length"), "steps": st.get("steps_trained"), "decision": st.get("decision"),
                    "failed_checks": st.get("failed_checks")}
                   for st in (s.get("stages") or []) if isinstance(st, dict)],
    }


def over_seeds(rows: list[dict]) -> dict:
    """mean ± std of every numeric figure over the seed runs."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "n": len(vals)}
    out["verdicts"] = [r["verdict"] for r in rows]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["seed1234", "seed1235", "seed1236"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.child:
        print("QUALITY_RESULT " + json.dumps(child(args.child, args.child_out)), flush=True)
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    for name in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--child-out", tmp],
                                  capture_output=True, text=True, env={**os.environ}, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("QUALITY_RESULT ")), None)
        if line is None:
            row = {"config": name, "error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}
        else:
            row = json.loads(line[len("QUALITY_RESULT "):])
        row["threads"] = os.environ.get("OMP_NUM_THREADS")
        row["load_avg_at_end"] = os.getloadavg()[0]
        results["runs"][name] = row
        print(json.dumps(row), flush=True)
        seeds = [r for k, r in results["runs"].items() if k.startswith("seed") and "error" not in r]
        if seeds:
            results["demo_over_seeds"] = over_seeds(seeds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if "demo_over_seeds" in results:
        print(json.dumps(results["demo_over_seeds"], indent=2))


if __name__ == "__main__":
    main()
