"""training.optimizer_scope: run -- one AdamW and one LR schedule across stages (warm-up once,
moments carried), and exact resume with it (the stage snapshots hold its state)."""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe


def _recipe(tmp_path, model_dir, name, **extra):
    return write_recipe(tmp_path / f"{name}.yaml", model_dir, tmp_path / "runs", run__run_id=name,
                        context__schedule=[128, 256], training__steps_per_stage=[4, 4],
                        training__snapshot_every=3, training__warmup_steps=3, training__lr_scheduler="linear",
                        training__optimizer_scope="run", scaling__lora__dropout=0.1, output__merge=False, **extra)


def _series(run_dir, metric):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["metric"] == metric:
            out[e["step"]] = e["value"]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_model

    from scaler_wizard.pipeline import run

    tmp = tmp_path_factory.mktemp("optscope")
    model_dir = save_tiny_model(tmp / "tiny", "llama", tiny_tokenizer)
    return model_dir, run(_recipe(tmp, model_dir, "ref"), self_approve=True)


def test_one_schedule_across_stages(reference):
    _, ref = reference
    lr = _series(ref.run_dir, "train/lr")
    steps = sorted(lr)
    assert steps == list(range(1, 9))
    # warm-up over steps 1-3 once, then a linear decay over all 8 planned steps: no second warm-up
    assert lr[1] < lr[2] < lr[3]
    assert all(lr[a] > lr[b] for a, b in zip(steps[3:], steps[4:]))
    assert lr[5] < lr[4]  # stage 2 starts where stage 1's schedule left off


def test_resume_with_a_run_wide_optimizer_is_exact(tmp_path, reference, monkeypatch):
    from scaler_wizard.pipeline import run
    from scaler_wizard.training import stage_trainer

    model_dir, ref = reference
    original = stage_trainer.ScalingTrainer.training_step
    calls = {"n": 0}

    def crash(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # stage 2, after the stage-start snapshot and before its mid-stage one
            raise RuntimeError("injected crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(stage_trainer.ScalingTrainer, "training_step", crash)
    with pytest.raises(RuntimeError, match="injected"):
        run(_recipe(tmp_path, model_dir, "crashy"), self_approve=True)
    monkeypatch.undo()
    result = run(resume=tmp_path / "runs" / "crashy", self_approve=True)
    assert _series(result.run_dir, "train/loss") == _series(ref.run_dir, "train/loss")
    assert _series(result.run_dir, "train/lr") == _series(ref.run_dir, "train/lr")
    assert result.summary["final"] == ref.summary["final"]
