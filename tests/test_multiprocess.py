"""The same recipe under ``accelerate launch`` with 2 CPU processes (gloo, DDP): the loss curve
equals the 1-process run with the same global batch, only the main process writes, and an
operator's abort stops every process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import save_tiny_model, write_recipe

pytestmark = pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                                reason="accelerate launcher not installed")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CLI = str(Path(sys.executable).parent / "scaler-wizard")


def _launch(recipe: Path, processes: int, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        cmd = [CLI, "run", str(recipe), "--self-approve"]
    else:
        # --multi_gpu selects accelerate's torchrun launcher; without a GPU the Trainer uses gloo on CPU
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", CLI, "run",
               str(recipe), "--self-approve"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("mp")
    model = save_tiny_model(tmp / "model", "llama", tiny_tokenizer)
    recipes = {}
    for name, micro in (("one", 4), ("two", 2)):  # same global batch: 4 rows per step
        recipes[name] = write_recipe(tmp / f"{name}.yaml", model, tmp / "runs", run__run_id=name,
                                     context__schedule=[128, 256], training__steps_per_stage=[6, 4],
                                     training__micro_batch_size=micro, training__snapshot_every=2,
                                     training__threads=1, scaling__lora__dropout=0.0, output__merge=False)
    codes, outputs = {}, {}
    for name, processes in (("one", 1), ("two", 2)):  # one after the other: 2 cores
        proc = _launch(recipes[name], processes, tmp)
        outputs[name] = proc.communicate(timeout=300)[0]
        codes[name] = proc.returncode
    return tmp, codes, outputs


def test_two_processes_same_loss_curve_and_main_process_writes(setup):
    tmp, codes, outputs = setup
    assert codes == {"one": 0, "two": 0}, outputs["two"][-3000:]
    runs = tmp / "runs"
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["one", "two"]

    def losses(name):
        events = [e for e in _events(runs / name) if e["metric"] == "train/loss"]
        steps = [e["step"] for e in events]
        assert len(steps) == len(set(steps)), f"{name}: a step logged twice (a second writer?)"
        return {e["step"]: e["value"] for e in events}

    one, two = losses("one"), losses("two")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    status = json.loads((runs / "two" / "status.json").read_text())
    assert status["state"] == "completed" and status["processes"] == 2
    assert (runs / "two" / "summary.json").exists() and (runs / "two" / "adapter").is_dir()
    audit = [json.loads(x)["event"] for x in (runs / "two" / "contract" / "audit.jsonl").read_text().splitlines()]
    assert audit.count("grant_issued") == 1  # one approval, by the main process
    from scaler_wizard.cache.checkpoints import CheckpointCache

    snaps = CheckpointCache(runs / ".checkpoints").list("two")
    one_snaps = CheckpointCache(runs / ".checkpoints").list("one")
    assert len(snaps) == len(one_snaps) > 0  # no snapshot committed twice
    assert all(CheckpointCache(runs / ".checkpoints").verify(s).ok for s in snaps)


def test_operator_abort_stops_every_process(setup):
    tmp = setup[0]
    recipe = write_recipe(tmp / "abort.yaml", tmp / "model", tmp / "runs", run__run_id="abort",
                          context__schedule=[128, 256], training__steps_per_stage=[400, 4],
                          training__micro_batch_size=2, training__threads=1, output__merge=False)
    proc = _launch(recipe, 2, tmp)
    run_dir = tmp / "runs" / "abort"
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and '"train/loss"' in metrics.read_text():
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("training never started")
    from scaler_wizard.safety.telegrams import append_control_command

    append_control_command(run_dir, "abort", source="test")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out[-2000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "RunHalted" in status["error"], status
    steps = [e["step"] for e in _events(run_dir) if e["metric"] == "train/loss"]
    assert max(steps) < 400  # stopped early, on every process (the launcher returned)
