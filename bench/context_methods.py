"""Methods table (issue 3): for `none`, `linear`, `ntk`, `dynamic` and `yarn` on the demo base
model, perplexity at 1x, 2x and 4x the base context and passkey accuracy at 4x -- zero-shot
(method applied, no training) and after the same fine-tuning budget (one LoRA stage straight
at 4x through the real pipeline, same seed, data and steps for every method).

    python bench/context_methods.py            # full: 40 steps per method, 50 passkey trials
    python bench/context_methods.py --quick    # smoke: 2 steps, 5 trials, 2 methods

Prints one JSON line and writes bench/results/context_methods.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results"

METHODS = ["none", "linear", "ntk", "dynamic", "yarn"]


def method_params(recipe, method: str) -> dict:
    """The demo recipe's YaRN settings for yarn (beta_fast 4 for a 256-token original context);
    every other method runs with its defaults."""
    return dict(recipe.context.method_params) if method == recipe.context.method else {}


def zero_shot(model_dir: Path, method: str, base: int, lengths: list[int], trials: int, windows: int, heldout,
              params: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scaler_wizard.context.methods import apply_to_model
    from scaler_wizard.evaluation.probes import PasskeyProbe, PerplexityProbe, ProbeContext, run_probe

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = int(1e12)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    apply_to_model(model, method, base, lengths[-1], params)
    stream = []
    for t in heldout:
        stream.extend(tok.encode(t, add_special_tokens=False) + [tok.eos_token_id])
    ctx = ProbeContext(tokenizer=tok, heldout_stream=stream, base_length=base)
    out = {}
    for length in lengths:
        r = run_probe(PerplexityProbe(windows), model, length, ctx)
        out[f"perplexity@{length}"] = r.metrics.get("perplexity")
        out[f"bits_per_byte@{length}"] = r.metrics.get("bits_per_byte")
    r = run_probe(PasskeyProbe(trials), model, lengths[-1], ctx)
    out[f"passkey@{lengths[-1]}"] = r.metrics.get("accuracy")
    return out


def fine_tuned(method: str, steps: int, trials: int, windows: int, runs_dir: Path, target: int):
    from scaler_wizard.pipeline import run

    def override(recipe):
        r = copy.deepcopy(recipe)
        r.run.output_dir = str(runs_dir)
        r.run.name = f"methods-{method}"
        r.context.method = method
        r.context.schedule = [target]
        r.context.target_length = target
        r.context.gate_policy = "continue"
        r.training.steps_per_stage = steps
        r.evaluation.passkey.trials = trials
        r.evaluation.perplexity.windows = windows
        r.evaluation.evaluate_base_at = [r.evaluation.evaluate_base_at[0]] if r.evaluation.evaluate_base_at else None
        r.output.merge = False
        r.training.threads = int(os.environ.get("BENCH_THREADS", "0")) or None
        r.context.method_params = method_params(recipe, method)
        return r

    t0 = time.time()
    result = run(None, recipe_overrides=override, self_approve=True)
    s = result.summary
    out = {k: v for k, v in s["final"].items()}
    out["train_wall_s"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from scaler_wizard.data import load_texts
    from scaler_wizard.recipe import load_recipe, resolve_path

    recipe, _ = load_recipe(None)
    model_dir = resolve_path(recipe.model.path)
    base = 256
    lengths = [base, 2 * base, 4 * base]
    methods = ["none", "yarn"] if args.quick else METHODS
    steps = 2 if args.quick else args.steps
    trials = 5 if args.quick else recipe.evaluation.passkey.trials
    windows = 2 if args.quick else recipe.evaluation.perplexity.windows
    heldout = load_texts([resolve_path(p) for p in recipe.data.eval], "text")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SCALER_WIZARD_HOME", str(Path(tmp) / "home"))
        for method in methods:
            zs = zero_shot(model_dir, method, base, lengths, trials, windows, heldout, method_params(recipe, method))
            ft = fine_tuned(method, steps, trials, windows, Path(tmp) / "runs", lengths[-1])
            rows[method] = {"zero_shot": zs, "fine_tuned": ft}
            print(json.dumps({"method": method, **rows[method]}), file=sys.stderr, flush=True)
    result = {
        "bench": "context_methods",
        "quick": args.quick,
        "model": str(recipe.model.path),
        "base_length": base,
        "fine_tune_steps": steps,
        "micro_batch_size": recipe.training.micro_batch_size,
        "synthetic_passkey_share": recipe.data.synthetic_passkey_share,
        "passkey_trials": trials,
        "perplexity_windows": windows,
        "yarn_params": method_params(recipe, "yarn"),
        "methods": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "context_methods_quick.json" if args.quick else "context_methods.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
