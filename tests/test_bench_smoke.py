"""Smoke run of ``bench/perf.py --quick`` (about a minute on 2 cores, two fresh child processes).

Opt-in: set SCALER_WIZARD_BENCH_SMOKE=1 and select the marker, e.g.
``SCALER_WIZARD_BENCH_SMOKE=1 pytest -m slow tests/test_bench_smoke.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("SCALER_WIZARD_BENCH_SMOKE") != "1",
                       reason="benchmark smoke runs only with SCALER_WIZARD_BENCH_SMOKE=1 (takes about a minute)"),
]


def test_perf_quick_runs_and_reports():
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "perf.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "quick"
    assert json.loads((ROOT / "bench" / "results" / "perf_quick.json").read_text())["mode"] == "quick"

    for kind in ("fixed", "variable"):
        part = result["throughput"][kind]
        assert part["baseline"]["tokens_per_s"] > 0 and part["ours"]["tokens_per_s"] > 0
        assert part["ratio"] == pytest.approx(part["ours"]["tokens_per_s"] / part["baseline"]["tokens_per_s"])
    waste = result["throughput"]["variable"]["padding_waste"]
    assert 0 <= waste["packed"] < waste["longest"] < waste["fixed"] < 1
    # packed rows carry more real tokens per step than pad-to-longest batches of the same size
    variable = result["throughput"]["variable"]
    assert variable["ours"]["real_tokens_per_step"] > variable["baseline"]["real_tokens_per_step"]

    memory = result["memory"]
    assert memory["losses_agree"]
    assert memory["chunked"]["peak_rss_mb"] < memory["stock"]["peak_rss_mb"]

    mfu = result["mfu"]
    assert mfu["matmul_peak_gflops"] > 0
    assert 0 < mfu["demo"]["mfu"] < 1.5  # measured peak is noisy on a shared CPU; guard against unit errors
