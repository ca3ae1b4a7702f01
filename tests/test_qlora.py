"""QLoRA as a recipe field (``model.quantization``): refused on CPU by preflight with the
alternative named, every problem reported at once; the BitsAndBytesConfig it builds."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import write_recipe

from scaler_wizard.errors import PlanError, RecipeError
from scaler_wizard.models import QLORA_CPU_HINT, load_causal_lm, quantization_config, quantization_kwargs
from scaler_wizard.preflight import check_inputs
from scaler_wizard.recipe import QuantizationSection, load_recipe

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is the CPU behaviour")


def _recipe(tmp_path, model_dir, **overrides):
    return load_recipe(write_recipe(tmp_path / "r.yaml", model_dir, tmp_path / "runs",
                                    model__quantization={"bits": 4, "quant_type": "nf4"}, **overrides))


@cpu_only
def test_qlora_refused_on_cpu_naming_the_alternative(tmp_path, tiny_model_dir):
    recipe, recipe_dir = _recipe(tmp_path, tiny_model_dir)
    with pytest.raises(PlanError) as err:
        check_inputs(recipe, recipe_dir, source="r.yaml")
    text = f"{err.value} {err.value.hint}"
    assert "CUDA GPU" in text and "QLoRA" in text
    assert "LoRA in bfloat16 or float32" in text  # the alternative is named


@cpu_only
def test_qlora_refusal_reported_with_the_other_problems(tmp_path, tiny_model_dir):
    recipe, recipe_dir = _recipe(tmp_path, tiny_model_dir, scaling__strategy="no-such-strategy")
    with pytest.raises(RecipeError) as err:
        check_inputs(recipe, recipe_dir, source="r.yaml")
    fields = [f for f, _ in err.value.problems]
    assert "model.quantization" in fields and "scaling.options" in fields


@cpu_only
def test_load_refuses_quantization_without_cuda(tiny_model_dir):
    from scaler_wizard.errors import ModelLoadError

    with pytest.raises(ModelLoadError) as err:
        load_causal_lm(tiny_model_dir, quantization=QuantizationSection(bits=4))
    assert err.value.hint == QLORA_CPU_HINT


def test_recipe_rejects_unknown_quantization_values(tmp_path, tiny_model_dir):
    with pytest.raises(RecipeError):
        load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs",
                                 model__quantization={"bits": 3}))


def test_bitsandbytes_config_from_the_recipe_field():
    four = quantization_kwargs(QuantizationSection(bits=4, quant_type="fp4", compute_dtype="float16",
                                                   double_quant=False))
    assert four == {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "float16",
                    "bnb_4bit_use_double_quant": False}
    assert quantization_kwargs(QuantizationSection(bits=8)) == {"load_in_8bit": True}
    # transformers' config object itself (no bitsandbytes needed to build it)
    config = quantization_config(QuantizationSection())
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_BNB and torch.cuda.is_available()), reason="needs bitsandbytes and a CUDA GPU")
def test_qlora_loads_4bit_on_gpu(tiny_model_dir):
    model, _ = load_causal_lm(tiny_model_dir, quantization=QuantizationSection(bits=4))
    assert getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False)
