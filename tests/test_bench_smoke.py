"""Smoke run of ``bench/perf.py --quick`` (every section, reduced sizes; about a minute on 2 idle
cores, more beside other work). Marked slow: ``pytest -m slow tests/test_bench_smoke.py``.

It checks that every comparison runs and reports consistent figures, not that targets are met:
at these sizes on a shared CPU the ratios are noise (the full run is ``python bench/perf.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("perf")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "perf.py"), "--quick", "--results-dir", str(out_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((out_dir / "perf_quick.json").read_text()) == result
    return result


def test_report_header(quick):
    assert quick["mode"] == "quick" and quick["command"] == "python bench/perf.py --quick"
    assert len(quick["load_average_before"]) == 3 and len(quick["load_average_after"]) == 3
    assert set(quick["section_s"]) == {"throughput", "memory", "distill", "mfu"}


def test_throughput_sides_and_chunk_choice(quick):
    for kind in ("fixed", "variable"):
        part = quick["throughput"][kind]
        assert part["baseline"]["tokens_per_s"] > 0 and part["ours"]["tokens_per_s"] > 0
        assert part["ratio"] == pytest.approx(part["ours"]["tokens_per_s"] / part["baseline"]["tokens_per_s"])
        # the demo vocabulary (4096) at 2 x 128 tokens fits the budget: one chunk, the whole sequence
        assert part["ours"]["loss_chunk_size"] == quick["throughput"]["seq"] - 1
        assert part["ours"]["chunks_per_batch"] == 1
    waste = quick["throughput"]["variable"]["padding_waste"]
    assert 0 <= waste["packed"] < waste["longest"] < waste["fixed"] < 1
    variable = quick["throughput"]["variable"]
    assert variable["ours"]["real_tokens_per_step"] > variable["baseline"]["real_tokens_per_step"]
    assert quick["verdicts"]["fixed_ratio"]["value"] == pytest.approx(quick["throughput"]["fixed"]["ratio"], abs=1e-3)


def test_memory_chunked_below_stock_and_same_loss(quick):
    memory = quick["memory"]
    assert memory["losses_agree"]
    # 1023 positions x 32,768 vocabulary do not fit 256 MB: the loss is cut into chunks
    assert memory["ours"]["loss_chunk_size"] < memory["seq"] - 1
    assert memory["ours"]["peak_rss_mb"] < memory["baseline"]["peak_rss_mb"]
    assert memory["ratio_peak_rss"] == pytest.approx(memory["ours"]["peak_rss_mb"] / memory["baseline"]["peak_rss_mb"])


def test_distillation_against_gkd_or_a_clear_skip(quick):
    distill = quick["distill"]
    if importlib.util.find_spec("trl") is None:
        assert "trl is not installed" in distill["skipped"]
        assert "distill_memory_ratio" not in quick["verdicts"]
        return
    mem = distill["memory"]
    # our teacher is the student itself: no second copy of the weights before the step starts
    assert mem["ours_distill"]["setup_rss_mb"] < mem["gkd"]["setup_rss_mb"]
    assert mem["ours_distill"]["peak_rss_mb"] < mem["gkd"]["peak_rss_mb"]
    # same objective, same weights (teacher = student base, LoRA B = 0): both losses ~ 0
    assert abs(mem["ours_distill"]["loss_value"]) < 1e-4 and abs(mem["gkd"]["loss_value"]) < 1e-4
    tp = distill["throughput"]
    assert tp["ratio"] == pytest.approx(tp["ours_distill"]["tokens_per_s"] / tp["gkd"]["tokens_per_s"])
    assert set(quick["verdicts"]) >= {"distill_memory_ratio", "distill_tokens_ratio"}


def test_mfu_is_a_fraction(quick):
    mfu = quick["mfu"]
    assert mfu["matmul_peak_gflops"] > 0
    assert 0 < mfu["demo"]["mfu_lora_4n"] < mfu["demo"]["mfu"] < 1.5  # noisy peak on a shared CPU


# -- bench/faults.py --quick (issue 6) -----------------------------------------------------------------
# 3 pipeline kills + resumes, NaN -> rollback, loss-spike replay, torn telemetry, 2 raw-loop kills, bit
# flips, ENOSPC, a 16 MB rollback: ~170 s of CPU (mostly 8 fresh processes importing torch, transformers
# and peft, ~10 s each), run 2 at a time: 130-170 s of wall time measured beside other jobs (load 3-5).


def test_faults_quick_runs_and_reports(tmp_path):
    out = tmp_path / "faults_quick.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "quick" and json.loads(out.read_text()) == result

    kills = result["pipeline_kills"]
    assert kills["kills"] >= 3 and kills["resumes"] >= kills["kills"]
    assert kills["corrupted_snapshots_chosen"] == 0
    assert kills["resumes_choosing_newest_valid"] == kills["resumes"]
    assert kills["runs_completed"] == kills["trials"]
    assert kills["loss_mismatches"] == 0 and kills["trials_with_all_losses_equal"] == kills["trials"]
    assert kills["loss_lines_compared"] >= kills["trials"] * kills["reference_steps"]
    assert kills["commit_steps_as_expected"]

    nan = result["nan_rollback"]
    assert nan["injected_step"] is not None and nan["stop_at_injected_step"]
    assert nan["rollbacks_logged"] == 1 and nan["completed"] and nan["final_loss_finite"]

    telemetry = result["telemetry_truncation"]
    assert telemetry["offsets"] > 100 and telemetry["reader_errors"] == telemetry["wrong_records"] == 0

    spikes = result["loss_spikes"]
    assert spikes["clean_steps"] >= 24 and 0 <= spikes["false_positive_rate"] <= 1
    assert all(part["injected"] > 0 for part in spikes["injected"].values())

    assert result["raw_loop_kills"]["all_resumed_losses_equal"]
    assert all(b["detected"] == b["files_flipped"] > 0 for b in result["bitflips"].values())
    assert result["enospc"]["previous_snapshot_verifies"]
    assert all(met is not False for met in result["targets"].values()), result["targets"]
