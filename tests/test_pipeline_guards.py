"""The pipeline's guards on tiny runs: distillation from the base model, a NaN halting the run
with a stop telegram and an alert, and the rollback policy recovering from it."""

import json

import pytest
import torch
from conftest import write_recipe

from scaler_wizard.errors import RunHalted
from scaler_wizard.pipeline import run
from scaler_wizard.training import stage_trainer


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_distillation_base_teacher_with_replay(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs",
                          distillation={"enabled": True, "teacher": "base", "replay_ratio": 0.5, "kd_weight": 0.5})
    result = run(recipe, self_approve=True)
    names = {e["metric"] for e in _events(result.run_dir)}
    assert {"distill/kl", "distill/ce"} <= names
    kl = [e["value"] for e in _events(result.run_dir) if e["metric"] == "distill/kl"]
    assert all(v is not None and v >= 0 for v in kl)
    assert result.summary["export_check"]["max_abs_logit_diff"] < 1e-4


@pytest.fixture
def nan_at_step(monkeypatch):
    """Make the loss NaN on the given global optimizer steps (1-based) of the first stage."""
    original = stage_trainer.ScalingTrainer.compute_loss
    calls = {"n": 0, "bad": set()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        calls["n"] += 1
        if calls["n"] in calls["bad"]:
            return loss * torch.tensor(float("nan"))
        return loss

    monkeypatch.setattr(stage_trainer.ScalingTrainer, "compute_loss", compute_loss)
    return calls


def test_nan_halts_run_with_stop_telegram_and_alert(tmp_path, tiny_model_dir, nan_at_step):
    nan_at_step["bad"] = {3}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs")
    with pytest.raises(RunHalted):
        run(recipe, self_approve=True)
    (run_dir,) = (tmp_path / "runs").glob("t-*")
    telegram = json.loads((run_dir / "telegram.json").read_text())
    assert telegram["action"] == "stop" and telegram["step"] == 3
    assert any("non-finite" in r or "nan" in r.lower() for r in telegram["reasons"])
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    assert not (run_dir / "summary.json").exists()
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert any(a.get("severity") == "critical" for a in alerts)
    losses = [e for e in _events(run_dir) if e["metric"] == "train/loss"]
    assert max(e["step"] for e in losses) == 3  # nothing trained after the stop


def test_rollback_policy_recovers_and_completes(tmp_path, tiny_model_dir, nan_at_step):
    nan_at_step["bad"] = {3}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs",
                          safety={"policy": {"on_stop": "rollback", "max_rollbacks": 1}})
    result = run(recipe, self_approve=True)
    rollbacks = [e for e in _events(result.run_dir) if e["metric"] == "safety/rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["lr"] == pytest.approx(0.005)
    assert json.loads((result.run_dir / "status.json").read_text())["state"] == "completed"


def test_block_expansion_grows_the_model_and_distills_from_bypassed_blocks(tmp_path, tiny_model_dir):
    """Real parameter growth through the pipeline: a plain, larger model comes out, and the base
    teacher is the grown model with its new blocks bypassed."""
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs",
                          scaling={"strategy": "block_expansion", "block_expansion": {"new_blocks": 1}},
                          distillation={"enabled": True, "teacher": "base", "replay_ratio": 0.25})
    result = run(recipe, self_approve=True)
    grown = AutoModelForCausalLM.from_pretrained(result.run_dir / "model")
    assert grown.config.num_hidden_layers == 3
    assert result.summary["export_check"]["max_abs_logit_diff"] < 1e-4
    assert not (result.run_dir / "adapter").exists()
    assert result.summary["trainable_params"] < result.summary["total_params"] / 2
    assert "distill/kl" in {e["metric"] for e in _events(result.run_dir)}


def test_unknown_strategy_is_a_clear_error_before_the_run(tmp_path, tiny_model_dir):
    from scaler_wizard.errors import ScalerWizardError

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs", scaling={"strategy": "magic"})
    with pytest.raises(ScalerWizardError, match="magic"):
        run(recipe, self_approve=True)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cockpit_rollback_of_a_finished_real_run_restores_cached_snapshot(tmp_path, tiny_model_dir):
    import secrets

    from fastapi.testclient import TestClient

    from scaler_wizard.cache.cache_cli import cockpit_rollback_handler
    from scaler_wizard.cockpit.server import create_app

    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, runs, training__steps_per_stage=2)
    run_dir = run(recipe, self_approve=True).run_dir
    token = secrets.token_urlsafe(32)
    client = TestClient(create_app(runs, token, ["testserver"], rollback_handler=cockpit_rollback_handler(runs)))
    csrf = client.get(f"/api/session?token={token}").json()["csrf_token"]
    snaps = client.get(f"/api/runs/{run_dir.name}/snapshots").json()
    snaps = snaps.get("snapshots", snaps) if isinstance(snaps, dict) else snaps
    assert snaps, "the pipeline left stage snapshots in the cache"
    target = snaps[0]
    r = client.post(f"/api/runs/{run_dir.name}/actions/rollback", json={"args": {"snapshot_id": target["snapshot_id"]}},
                    headers={"Origin": "http://testserver", "X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["applied"] is True
    restored = run_dir / "rollback" / target["snapshot_id"]
    assert restored.is_dir() and any(restored.rglob("*.safetensors"))
    control = [json.loads(line) for line in (run_dir / "control.jsonl").read_text().splitlines()]
    assert control[-1]["action"] == "rollback"


def test_manual_gate_waits_for_operator_approval(tmp_path, tiny_model_dir):
    import threading
    import time

    from scaler_wizard.safety.telegrams import append_control_command

    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, runs, training__steps_per_stage=2,
                          context__manual_gates=True, context__manual_gate_timeout_s=120)
    seen = {}

    def operator():
        deadline = time.time() + 110
        while time.time() < deadline:
            for status_file in runs.glob("*/status.json"):
                try:
                    status = json.loads(status_file.read_text())
                except (OSError, ValueError):
                    continue
                if status.get("awaiting_approval"):
                    seen["stage"] = status["stage"]
                    time.sleep(0.5)
                    append_control_command(status_file.parent, "approve", {"stage": status["stage"] + 1}, "test")
                    return
            time.sleep(0.1)

    t = threading.Thread(target=operator, daemon=True)
    t.start()
    result = run(recipe, self_approve=True)
    t.join(timeout=5)
    assert seen == {"stage": 1}
    events = _events(result.run_dir)
    waited = [e["step"] for e in events if e["metric"] == "gate/awaiting_approval"]
    approved = [e for e in events if e["metric"] == "gate/approved"]
    assert waited and approved and approved[0]["stage"] == 2
    stage2_losses = [e for e in events if e["metric"] == "train/loss" and e.get("stage") == 2]
    assert stage2_losses and min(e["timestamp"] for e in stage2_losses) > approved[0]["timestamp"]
