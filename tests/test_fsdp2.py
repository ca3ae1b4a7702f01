"""Sharded launch mode (``training.sharding: fsdp2``) with 2 CPU processes (gloo, torch FSDP2):
the per-step losses equal the 1-process run with the same global batch, each process holds about
half the parameters, the snapshots are sharded (every rank's shard in the cache, verified), a
run killed with SIGKILL resumes from its sharded snapshot to the same losses, and the merged
export of the sharded run reloads in plain transformers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import metric_by_step, save_tiny_model, write_recipe
from test_multiprocess import ACCELERATE, CLI, pytestmark  # noqa: F401 - same launcher, same skip

STEPS = [6, 4]


def _launch(args: list[str], processes: int, cwd: Path, **env_extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env_extra}
    if processes == 1:
        cmd = [CLI, "run", *args, "--self-approve"]
    else:
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", CLI, "run",
               *args, "--self-approve"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out += [int(child), *_descendants(int(child))]
    return out


def _losses(run_dir):
    return metric_by_step(run_dir, "train/loss")


def _metric(run_dir: Path, name: str) -> list[float]:
    return [json.loads(x)["value"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["metric"] == name]


def _recipe(tmp: Path, name: str, micro: int, sharding: str) -> Path:
    return write_recipe(tmp / f"{name}.yaml", tmp / "model", tmp / "runs", run__run_id=name,
                        context__schedule=[128, 256], training__steps_per_stage=STEPS,
                        training__micro_batch_size=micro, training__snapshot_every=2, training__sharding=sharding,
                        training__lr_scheduler="cosine", training__warmup_steps=2,
                        training__threads=1, scaling__lora__dropout=0.0, output__merge=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("fsdp2")
    save_tiny_model(tmp / "model", "llama", tiny_tokenizer)
    out = {}
    # same global batch (4 rows per step); one run after the other: 2 cores
    for name, processes, micro, sharding in (("one", 1, 4, "none"), ("two", 2, 2, "fsdp2")):
        proc = _launch([str(_recipe(tmp, name, micro, sharding))], processes, tmp)
        out[name] = (proc.communicate(timeout=400)[0], proc.returncode)
    return tmp, out


def test_two_sharded_processes_same_losses_half_the_parameters(runs):
    tmp, out = runs
    assert out["one"][1] == 0, out["one"][0][-3000:]
    assert out["two"][1] == 0, out["two"][0][-3000:]
    one, two = _losses(tmp / "runs" / "one"), _losses(tmp / "runs" / "two")
    assert sorted(one) == sorted(two) == list(range(1, sum(STEPS) + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    # per-process parameter bytes (shards) vs the whole model of the 1-process run
    total = json.loads((tmp / "runs" / "one" / "summary.json").read_text())
    per_process = _metric(tmp / "runs" / "two", "dist/param_bytes_per_process")
    assert len(per_process) == 1
    whole = _whole_parameter_bytes(total)
    assert 0.45 * whole <= per_process[0] <= 0.55 * whole, (per_process[0], whole)
    status = json.loads((tmp / "runs" / "two" / "status.json").read_text())
    assert status["state"] == "completed" and status["processes"] == 2


def _whole_parameter_bytes(summary: dict) -> float:
    return 4.0 * summary["total_params"]  # float32


def test_sharded_snapshots_hold_every_rank_shard_and_verify(runs):
    tmp, _ = runs
    from scaler_wizard.cache.checkpoints import CheckpointCache

    cache = CheckpointCache(tmp / "runs" / ".checkpoints")
    snaps = cache.list("two")
    assert len(snaps) == len(cache.list("one")) > 0  # one commit per snapshot, not one per rank
    for snap in snaps:
        assert cache.verify(snap).ok
        assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(snap.files)
        index = json.loads(cache.open_files(snap)["state.json"].read_text())
        assert index["format"] == "fsdp2-dcp" and index["world_size"] == 2
        # every file a rank reported is committed with that rank's sha256
        for rank, files in index["shards"].items():
            for name, digest in files.items():
                assert snap.files[name].sha256 == digest, (rank, name)
    assert not list((tmp / "runs" / ".checkpoints" / "tmp").glob("dcp.*"))  # staging cleaned


def test_sharded_export_reloads_in_plain_transformers(runs):
    tmp, _ = runs
    import torch
    from transformers import AutoModelForCausalLM

    summary = json.loads((tmp / "runs" / "two" / "summary.json").read_text())
    assert summary["export_check"]["max_abs_logit_diff"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(str(tmp / "runs" / "two" / "model"), local_files_only=True)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp / "runs" / "one" / "model"), local_files_only=True)
    window = torch.arange(1, 65)[None]
    with torch.no_grad():
        a, b = model(input_ids=window).logits, reference(input_ids=window).logits
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() < 1e-3  # the same training, sharded or not


def test_sigkill_then_resume_from_sharded_snapshot_same_losses(runs):
    tmp, _ = runs
    from scaler_wizard.cache.checkpoints import CheckpointCache

    recipe = _recipe(tmp, "kill", 2, "fsdp2")
    cache = CheckpointCache(tmp / "runs" / ".checkpoints")
    proc = _launch([str(recipe)], 2, tmp)
    metrics = tmp / "runs" / "kill" / "metrics.jsonl"
    deadline = time.time() + 300
    # step 5 logged: the mid-stage snapshot of step 4 is committed (commits block every rank)
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and 5 in _losses(tmp / "runs" / "kill"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    for pid in _descendants(proc.pid) + [proc.pid]:  # both ranks (torchrun starts each in its own session)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert max(_losses(tmp / "runs" / "kill")) < sum(STEPS)  # really interrupted
    assert any(s.step == 4 and s.phase == "train" for s in cache.list("kill"))
    resumed = _launch(["--resume", str(tmp / "runs" / "kill")], 2, tmp)
    text = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, text[-3000:]
    status = json.loads((tmp / "runs" / "kill" / "status.json").read_text())
    assert status["state"] == "completed" and status["resumes"][-1]["step"] >= 4
    reference, got = _losses(tmp / "runs" / "two"), _losses(tmp / "runs" / "kill")
    assert sorted(got) == sorted(reference)
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert all(cache.verify(s).ok for s in cache.list("kill"))


def test_sharded_retry_and_rollback_match_one_process(runs):
    """A failing gate under gate_policy rollback: the retry reloads the sharded stage-start
    snapshot (weights, and with optimizer_scope run the optimizer and schedule), the second
    failure rolls back to it; 2 sharded processes take the same decisions and losses as 1."""
    tmp, _ = runs
    results = {}
    for name, processes, micro, sharding in (("rb_one", 1, 4, "none"), ("rb_two", 2, 2, "fsdp2")):
        recipe = write_recipe(tmp / f"{name}.yaml", tmp / "model", tmp / "runs", run__run_id=name,
                              context__schedule=[128, 256], context__gate_policy="rollback",
                              training__steps_per_stage=3, training__micro_batch_size=micro,
                              training__sharding=sharding, training__optimizer_scope="run", training__snapshot_every=0,
                              training__threads=1, scaling__lora__dropout=0.0, output__merge=True,
                              evaluation__perplexity={"windows": 2, "max_ratio_to_base": 0.5})  # always fails
        proc = _launch([str(recipe)], processes, tmp)
        text = proc.communicate(timeout=400)[0]
        # completed, gates failed: exit 5 (the launcher reports a rank's non-zero exit as 1)
        assert proc.returncode == 5 or (processes > 1 and "exitcode  : 5" in text), text[-3000:]
        status = json.loads((tmp / "runs" / name / "status.json").read_text())
        assert status["state"] == "completed_gates_failed", status
        results[name] = json.loads((tmp / "runs" / name / "summary.json").read_text())
    one, two = results["rb_one"], results["rb_two"]
    assert [s["decision"] for s in two["stages"]] == [s["decision"] for s in one["stages"]] == ["rollback"]
    a, b = _losses(tmp / "runs" / "rb_one"), _losses(tmp / "runs" / "rb_two")
    assert sorted(a) == sorted(b) and len(a) == 3  # the retry re-logs the same 3 steps
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    # ended at the stage-start weights (the base model with its original positions)
    assert two["final"]["perplexity@64"] == pytest.approx(one["final"]["perplexity@64"], rel=1e-4)
    assert two["export_check"]["max_abs_logit_diff"] < 1e-4
