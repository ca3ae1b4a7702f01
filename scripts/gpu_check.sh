#!/usr/bin/env bash
# What a GPU machine must prove, in one command, within about 10 minutes (issue 16):
#   1. the `gpu`-marked tests (QLoRA 4-bit load through bitsandbytes, ...);
#   2. a bf16 run of a small Llama through `scaler-wizard run` (LoRA, sdpa, context doubled with
#      YaRN): tokens/s, MFU = tokens/s x (6*N + attention FLOPs) / the GPU's published bf16 peak,
#      and the memory planner's estimate vs the measured peak CUDA memory (scripts/gpu_check.py).
# Prints one JSON object and writes it to bench/results/gpu_check.json (OUT=... to change).
#   scripts/gpu_check.sh                      # random 16x1024 Llama, 2048 -> 4096 tokens
#   scripts/gpu_check.sh --model /path/to/hf  # a local model folder instead
#   GPU_PEAK_BF16_TFLOPS=989 scripts/gpu_check.sh   # a GPU the peak table does not know
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/gpu_check.json}
export HF_HUB_OFFLINE=1
START=$(date +%s)

nvidia=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
tests_out=$(timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs 2>&1)
tests_rc=$?
run_out=$(timeout 480 "$PY" scripts/gpu_check.py "$@" 2>/dev/null | tail -1)
run_rc=$?

export GC_TESTS_RC=$tests_rc GC_RUN_RC=$run_rc GC_START=$START GC_OUT=$OUT GC_NVIDIA=$nvidia
export GC_TESTS_OUT=$tests_out GC_RUN_OUT=$run_out
"$PY" - <<'PYEOF'
import json, os, re, sys, time
env = os.environ
tests_rc, tests_out, run_out = int(env["GC_TESTS_RC"]), env["GC_TESTS_OUT"], env["GC_RUN_OUT"]
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tests_out)}
try:
    run = json.loads(run_out)
except ValueError:
    run = {"ok": False, "error": run_out[-2000:] or "no output"}
result = {"check": "scaler-wizard gpu_check", "nvidia_smi": env["GC_NVIDIA"],
          "gpu_tests": {"exit_code": tests_rc, "ok": tests_rc == 0 and counts.get("passed", 0) > 0, **counts,
                        "tail": tests_out.splitlines()[-6:]},
          "bf16_run": run, "ok": tests_rc == 0 and bool(run.get("ok")),
          "wall_s": int(time.time()) - int(env["GC_START"])}
os.makedirs(os.path.dirname(env["GC_OUT"]) or ".", exist_ok=True)
with open(env["GC_OUT"], "w") as fh:
    fh.write(json.dumps(result, indent=1) + "\n")
print(json.dumps(result))
sys.exit(0 if result["ok"] else 1)
PYEOF
