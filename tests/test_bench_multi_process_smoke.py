"""Smoke run of bench/multi_process.py in its reduced mode: three launches (one of them
`accelerate launch` with 2 gloo processes) finish and report comparable figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_multi_process_bench_quick(tmp_path):
    out = tmp_path / "mp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "multi_process.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["runs"]["two_proc"]["processes"] == 2
    assert all(r["tokens_per_s"] > 0 for r in result["runs"].values())
    assert result["loss_curve_max_rel_diff"] < 1e-3  # same global batch -> same curve
