"""What a GPU machine must prove (issue 16), the Python half of ``scripts/gpu_check.sh``.

One bf16 run of a small Llama through the product path (``scaler-wizard run``: LoRA, sdpa,
its context doubled with YaRN in one stage), then:

* tokens/s: the Trainer-side ``train/tokens_per_s`` the run logs (median after the first interval);
* MFU = tokens/s x (6·N + attention FLOPs per token) / the GPU's published dense bf16 peak, with
  N the matmul parameters (embedding lookup and LoRA adapters excluded) and attention FLOPs per
  token 12·L·H·d·T (PaLM, Chowdhery et al. 2022, appendix B) at the trained length T;
* the memory planner's estimate (``scaling/memory.py``) for that exact configuration vs the peak
  CUDA memory the run measured (``summary.json`` ``peak_cuda_allocated_gb``).

The model is built here (random weights, the demo tokenizer; nothing is downloaded), or given with
``--model DIR`` (a local Hugging Face folder). Prints one JSON object.
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
DEMO = ROOT / "src" / "scaler_wizard" / "assets"
BIN = Path(sys.executable).parent

# Published dense (no sparsity) bf16 tensor-core peaks, FLOP/s; override with GPU_PEAK_BF16_TFLOPS.
PEAK_BF16 = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
    "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 6000 Ada": 364e12, "A6000": 155e12,
}


def gpu_peak_bf16(name: str) -> tuple[float | None, str]:
    env = os.environ.get("GPU_PEAK_BF16_TFLOPS")
    if env:
        return float(env) * 1e12, "GPU_PEAK_BF16_TFLOPS"
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # the most specific name first
        if key.lower() in name.lower():
            return PEAK_BF16[key], f"published dense bf16 peak of {key}"
    return None, f"unknown GPU {name!r}: set GPU_PEAK_BF16_TFLOPS"


def build_model(dest: Path, hidden: int, layers: int, base_length: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(DEMO / "demo_model"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=base_length, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rope_theta=10000.0)
    LlamaForCausalLM(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def write_recipe(path: Path, model: Path, runs: Path, target: int, steps: int, micro: int, rank: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "run": {"name": "gpu-check", "run_id": "gpu-check", "output_dir": str(runs), "seed": 1},
        "model": {"path": str(model), "dtype": "bfloat16", "attn_implementation": "sdpa"},
        "data": {"train": [str(DEMO / "demo_data" / "train.jsonl")]},
        "context": {"target_length": target, "schedule": [target], "method": "yarn", "gate_policy": "continue"},
        "scaling": {"strategy": "lora", "lora": {"rank": rank, "dropout": 0.0}},
        "training": {"steps_per_stage": steps, "micro_batch_size": micro, "logging_steps": 2, "learning_rate": 2e-4,
                     "warmup_steps": 2, "snapshot_every": 0, "gradient_checkpointing": False},
        "evaluation": {"passkey": {"trials": 10}, "perplexity": {"windows": 4}, "evaluate_base_at": [target // 2]},
        "output": {"merge": False},
    }))
    return path


def flops_per_token(model_dir: Path, seq: int) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    d = h // heads
    inter = cfg["intermediate_size"]
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter  # q, k, v, o, gate/up/down
    n_matmul = layers * per_layer + h * vocab  # + the output projection (the embedding lookup is no matmul)
    attention = 12 * layers * heads * d * seq
    return {"matmul_params": n_matmul, "attention_flops_per_token": attention,
            "model_flops_per_token": 6 * n_matmul + attention}


def planner_estimate(model_dir: Path, seq: int, micro: int, rank: int) -> dict:
    from scaler_wizard.scaling.memory import MemoryRequest, StrategyPlan, estimate_memory, read_model_dims

    dims = read_model_dims(model_dir)
    est = estimate_memory(dims, StrategyPlan(strategy="lora", lora_rank=rank),
                          MemoryRequest(seq_len=seq, micro_batch=micro, dtype="bfloat16", gradient_checkpointing=False,
                                        attn_implementation="sdpa", backend="cuda"))
    return {"total_gb": round(est.total / 2**30, 3), "breakdown_gb": est.breakdown_gb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a local HF model folder (default: a random Llama built here)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--base-length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--cpu-smoke", action="store_true", help="run the same steps on CPU (checks this script only)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(json.dumps({"check": "gpu_bf16_run", "ok": False, "error": "no CUDA device visible"}))
        raise SystemExit(2)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak, peak_source = gpu_peak_bf16(name)
    with tempfile.TemporaryDirectory(prefix="sw-gpu-check-") as tmp:
        work = Path(tmp)
        model = args.model or build_model(work / "model", args.hidden, args.layers, args.base_length)
        base = json.loads((model / "config.json").read_text())["max_position_embeddings"]
        target = 2 * base
        recipe = write_recipe(work / "recipe.yaml", model, work / "runs", target, args.steps, args.micro_batch, args.rank)
        t0 = time.perf_counter()
        proc = subprocess.run([str(BIN / "scaler-wizard"), "run", str(recipe), "--self-approve"], check=False, cwd=work,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        run_dir = work / "runs" / "gpu-check"
        result: dict = {"check": "gpu_bf16_run", "gpu": name, "base_length": base, "trained_length": target,
                        "micro_batch": args.micro_batch, "steps": args.steps, "wall_s": round(wall, 1),
                        "exit_code": proc.returncode}
        if proc.returncode not in (0, 5):  # 5: completed, gates failed (a random model passes no gate)
            result.update(ok=False, error=(proc.stdout + proc.stderr)[-3000:])
            print(json.dumps(result))
            raise SystemExit(1)
        events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        tps = [e["value"] for e in events if e["metric"] == "train/tokens_per_s"][1:]
        summary = json.loads((run_dir / "summary.json").read_text())
        tokens_per_s = statistics.median(tps) if tps else None
        f = flops_per_token(model, target)
        measured = summary.get("peak_cuda_allocated_gb")
        plan = planner_estimate(model, target, args.micro_batch, args.rank)
        result.update(
            ok=True, tokens_per_s=tokens_per_s, **f,
            achieved_tflops=tokens_per_s * f["model_flops_per_token"] / 1e12 if tokens_per_s else None,
            peak_bf16_tflops=peak / 1e12 if peak else None, peak_source=peak_source,
            mfu=tokens_per_s * f["model_flops_per_token"] / peak if (tokens_per_s and peak) else None,
            measured_peak_cuda_allocated_gb=measured, planner_estimate_gb=plan["total_gb"],
            planner_breakdown_gb=plan["breakdown_gb"],
            planner_over_measured=plan["total_gb"] / measured if measured else None,
            verdict=summary.get("verdict"), export_check=summary.get("export_check"))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
