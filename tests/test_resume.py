"""Exact resume: a run interrupted mid-stage and continued with ``run(resume=...)`` logs the same
per-step losses as an uninterrupted run with the same seed (exact float equality on CPU), and
bad resume requests fail clearly without touching the run."""

from __future__ import annotations

import json

import pytest
from conftest import metric_by_step, write_recipe

STEPS = [7, 6]  # two stages; snapshots every 3 steps -> mid-stage resume points at stage steps 3 and 6


def _recipe(tmp_path, model_dir, name):
    return write_recipe(
        tmp_path / f"{name}.yaml", model_dir, tmp_path / "runs",
        run__run_id=name,
        context__schedule=[128, 256],
        training__steps_per_stage=STEPS,
        training__snapshot_every=3,
        training__lr_scheduler="cosine",
        training__warmup_steps=2,
        scaling__lora__dropout=0.1,  # dropout draws from the RNG: resume must restore it exactly
        output__merge=False,
    )


def _losses(run_dir):
    return metric_by_step(run_dir, "train/loss")


class Crash(RuntimeError):
    pass


def _crash_at(monkeypatch, call_number):
    from scaler_wizard.training import stage_trainer

    original = stage_trainer.ScalingTrainer.training_step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call_number:
            raise Crash(f"injected crash at training step call {call_number}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(stage_trainer.ScalingTrainer, "training_step", step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_model

    from scaler_wizard.pipeline import run

    tmp = tmp_path_factory.mktemp("resume-ref")
    model_dir = save_tiny_model(tmp / "model", "llama", tiny_tokenizer, max_positions=64)
    result = run(_recipe(tmp, model_dir, "ref"), self_approve=True)
    return model_dir, _losses(result.run_dir), result.summary


@pytest.mark.parametrize("crash_call", [5, 12])  # stage 0 step 5 -> resume at 3; stage 1 step 5 -> resume at 7+3
def test_resumed_run_matches_uninterrupted_losses(tmp_path, monkeypatch, reference, crash_call):
    from scaler_wizard.pipeline import run

    model_dir, ref_losses, ref_summary = reference
    recipe = _recipe(tmp_path, model_dir, "crashy")
    with monkeypatch.context() as m:
        _crash_at(m, crash_call)
        with pytest.raises(Crash):
            run(recipe, self_approve=True)
    run_dir = tmp_path / "runs" / "crashy"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    assert not (run_dir / "summary.json").exists()

    result = run(resume=run_dir, self_approve=True)
    assert result.run_dir == run_dir
    losses = _losses(run_dir)
    assert len(ref_losses) == sum(STEPS)
    assert losses == ref_losses  # exact: same data order, dropout masks, optimizer and LR schedule
    assert result.summary["total_steps"] == ref_summary["total_steps"]
    assert result.summary["final"] == ref_summary["final"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and len(status["resumes"]) == 1
    resumed_at = status["resumes"][0]["step"]
    assert resumed_at == {5: 3, 12: 10}[crash_call]
    audit = [json.loads(line)["event"] for line in (run_dir / "contract" / "audit.jsonl").read_text().splitlines()]
    assert "resume_requested" in audit and audit.count("grant_issued") == 2
    # the envelope's loss window went on from the snapshot instead of restarting empty
    from scaler_wizard.cache.checkpoints import CheckpointCache
    from scaler_wizard.cache.state import read_data_position

    cache = CheckpointCache(run_dir.parent / ".checkpoints")
    snap = cache.get("crashy", status["resumes"][0]["snapshot"].split("/")[1])
    saved = read_data_position(cache.open_files(snap))["envelope"]
    assert [s for s, _ in saved["loss"]["window"]] == list(range(1, resumed_at + 1))[-len(saved["loss"]["window"]):]


def test_resume_refuses_completed_and_unknown_runs(tmp_path, reference):
    from scaler_wizard.errors import InputError, PlanError
    from scaler_wizard.pipeline import run

    runs = tmp_path.parent  # the reference run lives in another tmp folder; find it through its summary
    with pytest.raises(InputError, match="No run folder"):
        run(resume=tmp_path / "runs" / "nope", self_approve=True)
    model_dir = reference[0]
    ref_dir = model_dir.parent / "runs" / "ref"
    before = (ref_dir / "status.json").read_text()
    with pytest.raises(PlanError, match="completed"):
        run(resume=ref_dir, self_approve=True)
    assert (ref_dir / "status.json").read_text() == before
    assert runs.exists()


def test_resume_refuses_edited_recipe(tmp_path, monkeypatch, reference):
    from scaler_wizard.errors import PlanError
    from scaler_wizard.pipeline import run

    recipe = _recipe(tmp_path, reference[0], "edited")
    with monkeypatch.context() as m:
        _crash_at(m, 5)
        with pytest.raises(Crash):
            run(recipe, self_approve=True)
    run_dir = tmp_path / "runs" / "edited"
    resolved = run_dir / "recipe.resolved.yaml"
    resolved.write_text(resolved.read_text().replace("learning_rate: 0.01", "learning_rate: 0.02"))
    with pytest.raises(PlanError, match="no longer matches"):
        run(resume=run_dir, self_approve=True)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


def test_resume_refuses_a_run_that_is_still_alive(tmp_path):
    import subprocess
    import sys

    from scaler_wizard.errors import PlanError
    from scaler_wizard.resume import find_resume_point

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = tmp_path / "runs" / "alive"
        run_dir.mkdir(parents=True)
        (run_dir / "status.json").write_text(json.dumps({"state": "running", "pid": live.pid}))
        (run_dir / "envelope.json").write_text(json.dumps({"recipe_dir": str(tmp_path)}))
        with pytest.raises(PlanError, match="still running"):
            find_resume_point(run_dir)
    finally:
        live.kill()
        live.wait()
    with pytest.raises(PlanError, match="lacks recipe.resolved.yaml"):  # the process is gone now
        find_resume_point(run_dir)
