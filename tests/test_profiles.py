"""Profile Recommender: shipped templates, adjustments, written recipes, and the plan CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from scaler_wizard.errors import DataError, ModelLoadError, PlanError, RecipeError
from scaler_wizard.recipe import load_recipe, resolve_path
from scaler_wizard.scaling.hardware import GpuInfo, HardwareProfile
from scaler_wizard.scaling.plan_cli import hardware as hardware_cmd
from scaler_wizard.scaling.plan_cli import plan as plan_cmd
from scaler_wizard.scaling.profiles import USE_CASES, recommend, template_path, write_recommendation

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
        "max_position_embeddings": 256, "tie_word_embeddings": True}
LLAMA_31_8B = "builtin:assets/model_configs/Llama-3.1-8B"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "tiny-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY), encoding="utf-8")
    return d


@pytest.fixture
def data_file(tmp_path) -> Path:
    f = tmp_path / "corpus.jsonl"
    f.write_text(json.dumps({"text": "My own training text."}) + "\n", encoding="utf-8")
    return f


@pytest.fixture
def llama3_8b(tmp_path) -> str:
    """Llama-3-8B: the 3.1 shapes with the original 8K context (3.1 ships 128K already)."""
    config = json.loads((resolve_path(LLAMA_31_8B) / "config.json").read_text())
    config.update(max_position_embeddings=8192, rope_scaling=None)
    d = tmp_path / "llama3-8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(d)


def cpu(ram_gb: float | None) -> HardwareProfile:
    return HardwareProfile(accelerator="cpu", cpu_cores=2, ram_total_gb=ram_gb, ram_available_gb=ram_gb)


def gpu(gb: float, bnb: bool) -> HardwareProfile:
    return HardwareProfile(accelerator="cuda", bitsandbytes=bnb,
                           gpus=[GpuInfo(name="test", total_memory_gb=gb, bf16=True)])


@pytest.mark.parametrize("use_case", sorted(USE_CASES))
def test_every_template_is_a_valid_recipe(use_case):
    recipe, _ = load_recipe(template_path(use_case))
    assert recipe.scaling.strategy == "lora"


@pytest.mark.parametrize("use_case", sorted(USE_CASES))
def test_every_use_case_writes_a_valid_recipe(use_case, model_dir, tmp_path, data_file):
    rec = recommend(use_case, str(model_dir), cpu(16.0), data=[str(data_file)])
    out = tmp_path / f"{use_case}.yaml"
    recipe = write_recommendation(rec, out)
    again, _ = load_recipe(out)
    assert again == recipe
    assert recipe.data.train == [str(data_file.resolve())] and recipe.data.eval == []  # never the demo data
    assert recipe.model.path == str(model_dir.resolve())
    assert recipe.context.target_length == USE_CASES[use_case].context_multiplier * 256
    assert recipe.scaling.lora.rank == rec.plan.options["rank"]
    assert recipe.model.dtype == "float32"
    text = out.read_text()
    assert text.startswith("# Written by `scaler-wizard plan`") and "Adjustments:" in text
    assert all(a.reason for a in rec.adjustments)


def test_tight_memory_turns_on_checkpointing_then_caps_context(llama3_8b):
    roomy = recommend("long_context", llama3_8b, gpu(80, bnb=False), target_context=65536)
    assert roomy.target_length == 65536
    tight = recommend("code", llama3_8b, gpu(40, bnb=False), target_context=65536)
    fields = [a.field for a in tight.adjustments]
    assert "training.gradient_checkpointing" in fields
    assert "training.micro_batch_size" in fields and tight.recipe["training"]["micro_batch_size"] == 1
    # the effective batch is kept
    assert tight.recipe["training"]["gradient_accumulation_steps"] == 16
    capped = [a for a in tight.adjustments if a.field == "context.target_length" and "capped" in a.reason]
    assert capped and tight.target_length < 65536
    assert tight.plan.fits is True
    assert tight.recipe["model"]["dtype"] == "bfloat16"


def test_qlora_only_with_cuda_and_bitsandbytes(llama3_8b):
    from scaler_wizard.recipe import ModelSection

    with_bnb = recommend("budget", llama3_8b, gpu(40, bnb=True), target_context=65536)
    without = recommend("budget", llama3_8b, gpu(40, bnb=False), target_context=65536)
    assert not any("QLoRA" in n for n in without.notes)
    if "quantization" in ModelSection.model_fields:  # the recipe can say "load in 4 bits"
        assert with_bnb.plan.request.quantization == "4bit" and with_bnb.plan.fits is True
        assert with_bnb.recipe["model"]["quantization"] == "4bit"
        assert with_bnb.target_length > without.target_length
    else:  # it cannot: plan without, and say what QLoRA would give
        assert with_bnb.plan.request.quantization == "none"
        assert any("QLoRA" in n and "would fit" in n for n in with_bnb.notes)
    roomy = recommend("budget", llama3_8b, gpu(80, bnb=True), target_context=16384)
    assert roomy.plan.request.quantization == "none"  # QLoRA only when it is needed
    assert not any("QLoRA" in n for n in roomy.notes)
    on_cpu = recommend("budget", llama3_8b, cpu(256.0), target_context=16384)
    assert on_cpu.plan.request.quantization == "none"


def test_unknown_hardware_is_reported_not_assumed(model_dir):
    rec = recommend("chat", str(model_dir), None)
    assert rec.plan.fits is None
    assert any("unknown" in n for n in rec.notes)
    rec = recommend("chat", str(model_dir), cpu(None))
    assert any("unknown" in n for n in rec.notes)


def test_nothing_fits_is_a_clear_error(llama3_8b):
    with pytest.raises(PlanError, match="base context"):
        recommend("chat", llama3_8b, gpu(8, bnb=False), target_context=262144)


def test_bad_inputs(model_dir, tmp_path):
    with pytest.raises(PlanError, match="use case"):
        recommend("poetry", str(model_dir), cpu(16.0))
    with pytest.raises(PlanError, match="exceed"):
        recommend("chat", str(model_dir), cpu(16.0), target_context=128)
    with pytest.raises(ModelLoadError, match="No model config"):
        recommend("chat", str(tmp_path / "nowhere"), cpu(16.0))
    with pytest.raises(PlanError, match="capacity"):
        recommend("chat", str(model_dir), cpu(16.0), capacity=0)


def test_plan_and_hardware_commands(model_dir, tmp_path, data_file):
    app = typer.Typer()
    app.command("plan")(plan_cmd)
    app.command("hardware")(hardware_cmd)
    runner = CliRunner()
    result = runner.invoke(app, ["hardware", "--json", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    profile = json.loads(result.output)
    assert profile["source"] == "detected" and "cpu_cores" in profile

    hw = tmp_path / "hw.json"
    hw.write_text(cpu(8.0).model_dump_json(), encoding="utf-8")
    out = tmp_path / "recipe.yaml"
    result = runner.invoke(app, ["plan", "--model", str(model_dir), "--use-case", "long_context",
                                 "--target-context", "1024", "--hardware", str(hw), "-o", str(out), "--explain",
                                 "--data", str(data_file)])
    assert result.exit_code == 0, result.output
    assert "why" in result.output and "rank" in result.output
    recipe, _ = load_recipe(out)
    assert recipe.context.target_length == 1024
    assert yaml.safe_load(out.read_text())["scaling"]["lora"]["modules_to_save"] == ["norm"]


def test_without_data_the_written_recipe_fails_validation_saying_what_to_fill_in(model_dir, tmp_path):
    rec = recommend("long_context", str(model_dir), cpu(16.0))
    assert rec.missing_data
    out = tmp_path / "recipe.yaml"
    assert write_recommendation(rec, out) is None
    text = out.read_text()
    body = "".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("#"))
    assert "builtin:demo" not in body  # no demo data, train or eval
    assert "TODO data.train is empty" in text and "--data FILE" in text
    assert yaml.safe_load(text)["data"]["train"] == []
    with pytest.raises(RecipeError) as info:
        load_recipe(out)
    assert [path for path, _ in info.value.problems] == ["data.train"]  # everything else is valid
    # filling in data.train is all it takes
    edited = yaml.safe_load(text)
    edited["data"]["train"] = ["corpus.jsonl"]
    out.write_text(yaml.safe_dump(edited), encoding="utf-8")
    load_recipe(out)


def test_data_options_are_checked(model_dir, tmp_path, data_file):
    with pytest.raises(DataError, match="no such file"):
        recommend("chat", str(model_dir), cpu(16.0), data=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="without --data"):
        recommend("chat", str(model_dir), cpu(16.0), eval_data=[str(data_file)])
    rec = recommend("chat", str(model_dir), cpu(16.0), data=["builtin:demo/train.jsonl"],
                    eval_data=[str(data_file)])
    assert rec.recipe["data"]["train"] == ["builtin:demo/train.jsonl"]  # asked for explicitly
    assert rec.recipe["data"]["eval"] == [str(data_file.resolve())]


def test_plan_cli_data_options_and_probe_memory(model_dir, tmp_path, data_file):
    from scaler_wizard.cli import app as cli_app

    runner = CliRunner()
    hw = tmp_path / "hw.json"
    hw.write_text(cpu(8.0).model_dump_json(), encoding="utf-8")
    out = tmp_path / "with-data.yaml"
    result = runner.invoke(cli_app, ["plan", "--model", str(model_dir), "--hardware", str(hw), "--data",
                                     str(data_file), "--eval-data", str(data_file), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "probes at 2048 tokens" in result.output and "probe" in result.output
    recipe, _ = load_recipe(out)
    assert recipe.data.eval == [str(data_file.resolve())]
    bare = tmp_path / "no-data.yaml"
    result = runner.invoke(cli_app, ["plan", "--model", str(model_dir), "--hardware", str(hw), "-o", str(bare)])
    assert result.exit_code == 0, result.output
    assert "without training data" in result.output
    result = runner.invoke(cli_app, ["validate", str(bare)])
    assert result.exit_code != 0


def test_base_length_option(model_dir, data_file):
    rec = recommend("chat", str(model_dir), cpu(16.0), base_length=128, data=[str(data_file)])
    assert rec.base_length == 128 and rec.target_length == 256  # 2x the given base
    assert rec.recipe["context"]["base_length"] == 128
    with pytest.raises(PlanError, match="base length 512"):
        recommend("chat", str(model_dir), cpu(16.0), base_length=512)
