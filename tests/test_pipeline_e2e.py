"""End-to-end runs of the pipeline on tiny random models (few steps): artifacts, telemetry,
loss going down, and the merged model reloading with plain transformers."""

import json

import pytest
import torch
from conftest import save_tiny_model, write_recipe

from scaler_wizard.pipeline import run

EXPECTED = ["status.json", "envelope.json", "recipe.resolved.yaml", "metrics.jsonl", "summary.json",
            "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model/config.json",
            "model/model.safetensors", "report/report.html", "report/perplexity_vs_length.png",
            "report/passkey_heatmap.png"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_pipeline_runs_each_architecture(tmp_path, tiny_tokenizer, arch):
    model_dir = save_tiny_model(tmp_path / arch, arch, tiny_tokenizer)
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, tmp_path / "runs",
                          data__synthetic_passkey_share=0.0)
    result = run(recipe, self_approve=True)
    d = result.run_dir
    for rel in EXPECTED:
        assert (d / rel).exists(), rel
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "completed"
    s = result.summary
    assert [st["length"] for st in s["stages"]] == [128, 256]
    assert s["train_loss_last"] < s["train_loss_first"]
    assert s["export_check"]["max_abs_logit_diff"] < 1e-4
    cfg = json.loads((d / "model/config.json").read_text())
    assert cfg["max_position_embeddings"] == 256
    assert cfg["rope_parameters"]["rope_type"] == "yarn"
    assert cfg["rope_parameters"]["factor"] == 4.0
    assert cfg["rope_parameters"]["original_max_position_embeddings"] == 64
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0

    events = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "metric", "timestamp"} <= set(events[0])
    names = {e["metric"] for e in events}
    assert {"train/loss", "eval/perplexity@256", "probe/passkey@256", "gate/passed",
            "base/eval/perplexity@64"} <= names
    assert all(e["timestamp"].endswith("Z") for e in events)


def test_merged_model_matches_adapter_on_scaled_base(tmp_path, tiny_tokenizer):
    """Independent check of the export: plain transformers on model/ == PEFT adapter on the base
    model with the scaled RoPE applied by our context method."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from scaler_wizard.context.methods import apply_to_model

    model_dir = save_tiny_model(tmp_path / "m", "llama", tiny_tokenizer)
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, tmp_path / "runs")
    d = run(recipe, self_approve=True).run_dir
    plain = AutoModelForCausalLM.from_pretrained(d / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_to_model(base, "yarn", 64, 256)
    adapted = PeftModel.from_pretrained(base, d / "adapter")
    ids = torch.randint(0, len(tiny_tokenizer), (1, 200))
    with torch.no_grad():
        a = plain(input_ids=ids).logits
        b = adapted(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    # and the scaling really changed the model: the unscaled base differs
    with torch.no_grad():
        c = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
    assert not torch.allclose(a, c, atol=1e-3)


def test_no_approval_means_no_model_loaded_and_no_step(tmp_path, tiny_model_dir, monkeypatch):
    """Without a contract or self-approval the run is rejected before the model is loaded."""
    from scaler_wizard import pipeline
    from scaler_wizard.errors import ContractError

    loaded = []
    monkeypatch.setattr(pipeline, "load_causal_lm", lambda *a, **k: loaded.append(1))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs")
    with pytest.raises(ContractError):
        run(recipe)
    assert loaded == []
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "rejected"
    assert not (run_dir / "summary.json").exists() and not (run_dir / "metrics.jsonl").exists()
    assert (run_dir / "contract" / "audit.jsonl").exists()


def test_shipped_demo_recipe_runs_on_the_embedded_model(tmp_path):
    """The shipped recipe and the embedded demo model, with a 1-step budget per stage."""
    def shrink(recipe):
        r = recipe.model_copy(deep=True)
        r.run.output_dir = str(tmp_path / "runs")
        r.training.steps_per_stage = [1, 1]
        r.evaluation.passkey.trials = 2
        r.evaluation.perplexity.windows = 1
        r.evaluation.evaluate_base_at = [256]
        return r

    result = run(None, recipe_overrides=shrink, self_approve=True)
    s = result.summary
    assert s["base_length"] == 256 and s["target_length"] == 1024 and s["gate_policy"] == "extend"
    assert s["export_check"]["max_abs_logit_diff"] < 1e-3
    assert {"train/loss/lm", "train/loss/retrieval", "train/loss/kd"} <= {
        json.loads(x)["metric"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()}
    cfg = json.loads((result.run_dir / "model" / "config.json").read_text())
    if s["verdict"] == "passed":  # every stage passed: the model is scaled to the target
        assert [st["length"] for st in s["stages"]] == [512, 1024]
        assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["max_position_embeddings"] == 1024
    else:  # the embedded model fails stage 1's passkey gate twice (extend), the run ends at the base pair
        assert s["stages"][-1]["decision"] == "stop" and s["stages"][-1]["steps_trained"] == 2
        assert cfg["max_position_embeddings"] == s["reached_length"]
        assert json.loads((result.run_dir / "status.json").read_text())["state"] == "completed_gates_failed"


def test_full_finetuning_through_the_pipeline_with_the_base_folder_as_teacher(tmp_path, tiny_tokenizer):
    """strategy full: every weight changes, the teacher is the base folder (teacher: model), the
    KD term is logged, and the export is the trained model with the scaled position encoding."""
    from safetensors.torch import load_file

    model_dir = save_tiny_model(tmp_path / "m", "llama", tiny_tokenizer)
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, tmp_path / "runs", scaling__strategy="full",
                          distillation__enabled=True, distillation__teacher="model",
                          distillation__teacher_path=str(model_dir), distillation__kd_weight=0.5)
    result = run(recipe, self_approve=True)
    d = result.run_dir
    assert json.loads((d / "status.json").read_text())["state"] == "completed"
    assert not (d / "adapter").exists()
    before, after = load_file(model_dir / "model.safetensors"), load_file(d / "model" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert any("layers.1.mlp.down_proj" in k for k in changed)
    assert json.loads((d / "model/config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
    names = {json.loads(line)["metric"] for line in (d / "metrics.jsonl").read_text().splitlines()}
    assert "train/loss/kd" in names
