"""Smoke runs of the benchmarks' ``--quick`` modes (reduced sizes, 2 kept rounds). Marked slow:
``pytest -m slow tests/test_bench_smoke.py``. ``bench/perf.py --quick`` takes about 1.5 minutes on
2 idle cores (every default section), its ``llama1b`` section ~40 s more.

They check that every comparison runs through the harness and reports consistent figures, not
that targets are met: at these sizes on a shared CPU the ratios are noise (the full runs are
``python bench/perf.py`` etc.).
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
VERDICTS = {"met", "missed", "not resolved"}


def _run_perf(out_dir: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "perf.py"), "--quick", "--results-dir", str(out_dir),
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("perf")
    result = _run_perf(out_dir)
    assert json.loads((out_dir / "perf_quick.json").read_text()) == result
    return result


def _check_ratio(summary: dict, part: dict) -> None:
    """A harness figure: median ratio inside its interval, samples from the sides' own runs."""
    low, high = summary["ci95"]
    assert low <= summary["ratio"] <= high and summary["repeats"] == len(summary["numerator"]) >= 1
    assert summary["numerator"] == pytest.approx(part[summary["of"]]["tokens_per_s"], rel=1e-4)
    assert summary["denominator"] == pytest.approx(part[summary["over"]]["tokens_per_s"], rel=1e-4)
    if "target" in summary:
        assert summary["verdict"] in VERDICTS


def test_report_header(quick):
    assert quick["mode"] == "quick" and quick["command"].startswith("python bench/perf.py --quick")
    assert len(quick["load_average_before"]) == 3 and len(quick["load_average_after"]) == 3
    assert quick["machine"]["torch_threads"] == 1 and len(quick["machine"]["loadavg_1_5_15"]) == 3
    assert set(quick["section_s"]) == {"throughput", "memory", "distill", "mfu"}
    assert quick["settings"]["repeats"] == 2 and quick["settings"]["warmup"] == 1


def test_fixed_rows_through_the_harness(quick):
    part = quick["throughput"]["fixed"]
    assert part["repeats"] == 2 and part["warmup_rounds"] == 1 and len(part["load_before"]) == 3
    for side in ("baseline", "ours"):
        assert len(part[side]["tokens_per_s"]) == 2 and all(t > 0 for t in part[side]["tokens_per_s"])
        assert part[side]["real_tokens"] == quick["throughput"]["batch"] * quick["throughput"]["seq"] * part[side]["steps"]
    _check_ratio(part["ratio"], part)
    # the demo vocabulary (4096) at 2 x 128 tokens fits the budget: one chunk, the whole sequence
    assert part["ours"]["loss_chunk_size"] == quick["throughput"]["seq"] - 1 and part["ours"]["chunks_per_batch"] == 1
    assert quick["verdicts"]["fixed_ratio"]["ratio"] == part["ratio"]["ratio"]


def test_variable_length_against_the_strongest_stock_baseline(quick):
    part = quick["throughput"]["variable"]
    sides = ("stock_grouped", "stock_flattening", "ours_sdpa_mask", "ours_document_attention")
    for side in sides:  # every side saw every document exactly once
        assert part[side]["real_tokens"] == part["document_tokens"]
    assert part["stock_grouped"]["sampling"] == "group_by_length"
    assert part["ours_document_attention"]["attention"] == "document"
    assert part["ours_sdpa_mask"]["steps"] < part["stock_grouped"]["steps"]  # packed rows: fewer steps
    med = {s: part[s]["tokens_per_s_median"] for s in sides}
    assert part["strongest_stock"] == max(("stock_grouped", "stock_flattening"), key=med.get)
    assert part["ours"] == max(("ours_sdpa_mask", "ours_document_attention"), key=med.get)
    assert (part["ratio"]["of"], part["ratio"]["over"]) == (part["ours"], part["strongest_stock"])
    assert part["ratio"]["target"] == 1.3
    for key in ("ratio", "ratio_vs_other_stock", "document_attention_vs_sdpa_mask", "flattening_vs_grouped"):
        _check_ratio(part[key], part)
    waste = part["padding_waste"]
    assert 0 <= waste["packed"] < waste["longest"] < waste["fixed"] < 1
    assert quick["verdicts"]["variable_ratio"]["verdict"] == part["ratio"]["verdict"]


def test_memory_chunked_below_stock_and_same_loss(quick):
    memory = quick["memory"]
    assert memory["losses_agree"]
    # 1023 positions x 32,768 vocabulary do not fit 256 MB: the loss is cut into chunks
    assert memory["ours"]["loss_chunk_size"] < memory["seq"] - 1
    assert memory["ours"]["peak_rss_mb"] < memory["baseline"]["peak_rss_mb"]
    assert memory["ratio"]["ratio"] == pytest.approx(memory["ours"]["peak_rss_mb"] / memory["baseline"]["peak_rss_mb"],
                                                     rel=1e-3)
    assert memory["ratio"]["verdict"] in VERDICTS
    for side in ("baseline", "ours"):  # the parent's psutil sampling sees (nearly) the child's own peak
        part = memory[side]
        assert part["peak_is_training_only"] and part["setup_rss_mb"] < part["peak_rss_mb"] <= part["process_peak_rss_mb"]
        assert 0.5 * part["peak_rss_mb"] < part["sampled_peak_rss_mb"] <= part["process_peak_rss_mb"] + 64


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
    _check_ratio(distill["throughput"]["ratio"], distill["throughput"])
    assert set(quick["verdicts"]) >= {"distill_memory_ratio", "distill_tokens_ratio"}


def test_mfu_is_physically_possible(quick):
    mfu = quick["mfu"]
    peak = mfu["peak"]
    assert peak["peak_gflops"] == max(peak["gflops_by_shape"].values()) > 0 and len(peak["gflops_by_shape"]) >= 3
    demo = mfu["demo"]
    assert demo["tokens_per_s_runs"] == pytest.approx(quick["throughput"]["fixed"]["ours"]["tokens_per_s"], rel=1e-4)
    # LoRA convention (4 N_frozen + 6 N_lora + attention): a fraction of the measured peak
    assert 0 < demo["mfu_range"][0] <= demo["mfu"] <= demo["mfu_range"][1] <= 1.0
    assert demo["flops_lora"] < demo["flops_palm_6n"] and demo["mfu"] < demo["mfu_palm_6n"]
    assert demo["achieved_gflops"] <= peak["peak_gflops"]


def test_llama1b_memory_section_quick(tmp_path):
    result = _run_perf(tmp_path, "--sections", "llama1b")
    assert json.loads((tmp_path / "perf_llama1b_quick.json").read_text()) == result
    part = result["llama1b"]
    assert part["gradient_checkpointing"] and part["batch"] == 1 and part["model"]["tied"]
    for side in ("baseline", "ours"):
        assert part[side]["gradient_checkpointing"] and part[side]["seq"] == part["seq"]
        assert part[side]["peak_rss_mb"] > part[side]["setup_rss_mb"] > 0
    assert abs(part["baseline"]["loss_value"] - part["ours"]["loss_value"]) < 1e-3
    assert part["ratio_peak_rss"] == pytest.approx(part["ours"]["peak_rss_mb"] / part["baseline"]["peak_rss_mb"],
                                                   abs=1e-3)


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
    demo = spikes["at_demo_logging_steps"]
    assert demo["logging_steps"] == 5 and sum(demo["observations"].values()) < spikes["clean_steps"]
    head = spikes["headline_detection"]
    assert set(head) == {"logging_steps=1", "logging_steps=5 (demo)"}
    for rates in head.values():  # over all spikes, not only those after the envelope's warm-up
        assert all(0 <= r["all_spikes"] <= 1 and r["injected"] > 0 for r in rates.values())

    assert result["raw_loop_kills"]["all_resumed_losses_equal"]
    assert all(b["detected"] == b["files_flipped"] > 0 for b in result["bitflips"].values())
    assert result["enospc"]["previous_snapshot_verifies"]
    assert all(met is not False for met in result["targets"].values()), result["targets"]


# -- bench/telemetry_overhead.py --quick (issue 18): the overhead through the harness -------------


def test_telemetry_overhead_quick(tmp_path):
    out = tmp_path / "telemetry_quick.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "telemetry_overhead.py"), "--quick", "--output",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "quick" and json.loads(out.read_text()) == result
    for name in ("tiny", "demo"):
        part = result["steps"][name]
        assert part["repeats"] == 2 and part["warmup_rounds"] == 1 and len(part["load_before"]) == 3
        for key in ("overhead_direct", "overhead_wall_ab", "overhead_at_demo_logging_steps"):
            low, high = part[key]["ci95"]
            assert low <= part[key]["ratio"] <= high and part[key]["verdict"] in VERDICTS
            assert len(part[key]["numerator"]) == 2
        assert 0 < part["telemetry_ms_per_step_median"] < part["step_ms_median"]
        assert part["overhead_at_demo_logging_steps"]["logging_steps"] == 5
        assert part["overhead_at_demo_logging_steps"]["ratio"] < part["overhead_direct"]["ratio"]
        assert part["warn_telegrams"] >= 0
    assert result["verdict"] == result["steps"]["demo"]["overhead_direct"]["verdict"]
    assert result["events"] == 20_000 and result["sink_events_per_s"] > 0


# -- bench/preservation.py: none / replay / base over seeds ----------------------------------------


def _preservation_module():
    spec = importlib.util.spec_from_file_location("sw_bench_preservation", ROOT / "bench" / "preservation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seeds", [1, 3])
def test_preservation_summary_over_seeds(seeds):
    """The aggregation alone (no runs): median, mean +- std per mode, differences paired by seed."""
    mod = _preservation_module()
    rows = []
    for k in range(seeds):
        for mode, kl, pk in (("none", 0.03, 0.4), ("replay", 0.02, 0.4), ("base", 0.01, 0.5)):
            row = {m: 1.0 + k for m in mod.METRICS}
            row.update({"mode": mode, "seed": 1234 + k, "kl_to_base_per_token@256": kl * (1 + k), "passkey@1024": pk})
            rows.append(row)
    rows.append({"mode": "base", "seed": 99, "error": "boom"})  # a failed run is left out, not averaged
    summary, derived = mod.summarise(rows)
    assert set(summary) == {"none", "replay", "base"}
    kl = summary["base"]["kl_to_base_per_token@256"]
    assert summary["base"]["seeds"] == [1234 + k for k in range(seeds)] and kl["n"] == seeds
    assert kl["mean"] == pytest.approx(sum(0.01 * (1 + k) for k in range(seeds)) / seeds)
    assert (kl["std"] is None) == (seeds == 1) and ("+-" in kl["shown"]) == (seeds > 1)
    assert derived["base_minus_none"]["kl_to_base_ratio"]["median"] == pytest.approx(1 / 3)
    assert derived["base_minus_none"]["passkey_points"]["mean"] == pytest.approx(10.0)
    assert derived["replay_minus_none"]["passkey_points"]["mean"] == pytest.approx(0.0)


def test_preservation_quick(tmp_path):
    """none / replay / base, one seed each, 2 steps per stage (~3 pipeline runs: 3-6 minutes)."""
    out = tmp_path / "preservation_quick.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "preservation.py"), "--quick", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result and result["errors"] == 0, result["rows"]
    assert result["seeds"] == [1234] and result["steps_per_stage"] == [2, 2]
    assert set(result["summary"]) == {"none", "replay", "base"}
    by = {r["mode"]: r for r in result["rows"]}
    assert by["none"]["replay_ratio"] == 0 and by["none"]["kd_weight"] == 0
    assert by["replay"]["replay_ratio"] == result["replay_ratio"] > 0 and by["replay"]["kd_weight"] == 0
    assert by["base"]["kd_weight"] == result["kd_weight"] > 0 and by["base"]["replay_ratio"] == result["replay_ratio"]
    for mode, row in by.items():
        assert row["kl_to_base_per_token@256"] > 0 and 0 <= row["passkey@1024"] <= 1, mode
        assert result["summary"][mode]["kl_to_base_per_token@256"]["n"] == 1
    assert set(result["derived"]) == {"replay_minus_none", "base_minus_none"}
