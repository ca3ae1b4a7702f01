"""The demo's figures through an outside harness: lm-evaluation-harness (issue 13).

Our probes measure perplexity and passkey retrieval with our own code. This script measures the
same models with EleutherAI's lm-evaluation-harness, in-process and offline:

* ``kjv_heldout`` bits per byte: a ``loglikelihood_rolling`` task over the demo's held-out KJV
  chapters (``assets/demo_data/heldout.jsonl``, never trained on), four chapters joined per
  document so a document spans more than 1024 tokens; lm-eval scores each document in rolling
  windows of the model's ``max_length`` (256: every token sees at most 256 tokens of context;
  1024: up to 1024). Bits per byte do not depend on the tokenizer.
* RULER ``niah_single_1`` (Hsieh et al. 2024): a needle ("One of the special magic numbers for
  <key> is: <number>.") in a haystack of repeated sentences, generated at each length with the
  model's own tokenizer; scored by lm-eval (exact substring match of the generated answer). Its
  wording is neither the project's probe template nor any training row's: a held-out template.

Models: any Hugging Face folders, e.g. the embedded base model and a run's exported model
(``runs/<run-id>/model``). The base is scored as it is (unscaled, extrapolating beyond 256).

    OMP_NUM_THREADS=2 python bench/outside_harness.py \\
        --model base=src/scaler_wizard/assets/demo_model --model scaled=runs/<run-id>/model \\
        --lengths 256 1024 --ruler-limit 50
Results: bench/results/outside_harness.json (one row per model and length) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

HELDOUT = ROOT / "src" / "scaler_wizard" / "assets" / "demo_data" / "heldout.jsonl"
OUT = ROOT / "bench" / "results" / "outside_harness.json"
CHAPTERS_PER_DOC = 4

TASK_YAML = """task: kjv_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_task(folder: Path) -> None:
    rows = [json.loads(line)["text"] for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = ["\n\n".join(rows[i:i + CHAPTERS_PER_DOC]) for i in range(0, len(rows), CHAPTERS_PER_DOC)]
    data = folder / "kjv_heldout.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (folder / "kjv_heldout.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")


def evaluate(model_dir: Path, length: int, ruler_limit: int, task_dir: Path) -> dict:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scaler_wizard.evaluation.lm_eval_probe import harness_context, task_figures

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    row: dict = {"length": length}
    with harness_context() as log, torch.no_grad():
        try:
            manager = TaskManager(include_path=str(task_dir),
                                  metadata={"max_seq_lengths": [length], "tokenizer": str(model_dir)})
            lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=length, batch_size=1)
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(model=lm, tasks=["kjv_heldout"], task_manager=manager, bootstrap_iters=0)
            row.update(task_figures(out["results"], length))
            row["kjv_seconds"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(model=lm, tasks=["niah_single_1"], task_manager=manager,
                                          limit=ruler_limit, bootstrap_iters=0)
            row.update(task_figures(out["results"], length))
            row["niah_samples"] = ruler_limit
            row["niah_seconds"] = round(time.perf_counter() - t0, 1)
        except Exception as exc:  # noqa: BLE001 - report the harness's own words
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["log_tail"] = log.getvalue()[-1500:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=FOLDER (repeatable)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--ruler-limit", type=int, default=50, help="niah_single_1 samples per length")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    models = {}
    for spec in args.model:
        name, sep, folder = spec.partition("=")
        if not sep or not Path(folder).is_dir():
            raise SystemExit(f"--model {spec!r}: expected NAME=FOLDER with an existing model folder")
        models[name] = Path(folder).resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="outside-harness-") as tmp:
        write_task(Path(tmp))
        for name, folder in models.items():
            for length in args.lengths:
                row = {"model": name, "folder": str(folder), **evaluate(folder, length, args.ruler_limit, Path(tmp))}
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "chapters_per_doc": CHAPTERS_PER_DOC}, indent=2) + "\n")
    print(f"\n{'model':10} {'length':>6} {'bits/byte':>10} {'niah_single_1':>14}")
    for r in rows:
        print(f"{r['model']:10} {r['length']:>6} {r.get('kjv_heldout/bits_per_byte', float('nan')):>10.4f} "
              f"{r.get('niah_single_1/score', float('nan')):>14.3f}")


if __name__ == "__main__":
    main()
