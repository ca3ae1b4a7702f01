"""Adaptive Rank Resolver: properties, calibration and bad inputs (pure: no model needed,
except the one check that PEFT accepts the calibrated pattern)."""

from __future__ import annotations

import json
import random

import pytest

from scaler_wizard.errors import ModelLoadError, PlanError
from scaler_wizard.scaling.hardware import GpuInfo, HardwareProfile
from scaler_wizard.scaling.memory import (
    ALL_LINEAR,
    MemoryRequest,
    ModelDims,
    estimate_memory,
    lora_params,
    module_names,
    read_model_dims,
)
from scaler_wizard.scaling.rank_resolver import calibrate_rank_pattern, rank_grid, resolve_plan
from scaler_wizard.scaling.strategies import get_strategy

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256}
TINY = ModelDims.from_config(CONFIG)
# an 8B-class shape, for memory-bound behaviour (pure arithmetic, nothing is allocated)
BIG = ModelDims.from_config({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                             "max_position_embeddings": 131072})
REQ = MemoryRequest(seq_len=16384, micro_batch=1, dtype="bfloat16", gradient_checkpointing=True, loss_chunk=1024)


def gpu(gb: float) -> HardwareProfile:
    return HardwareProfile(accelerator="cuda", gpus=[GpuInfo(name="test", total_memory_gb=gb, bf16=True)],
                           bitsandbytes=False)


def test_monotone_in_budget_and_never_over_it():
    last = 0
    for capacity in [0.005, 0.008, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0]:
        plan = resolve_plan(TINY, capacity, max_rank=512)
        assert plan.trainable_params <= capacity * TINY.n_params()
        assert plan.trainable_params >= last
        last = plan.trainable_params
    # block expansion too
    last = 0
    for capacity in [0.1, 0.2, 0.4, 0.8]:
        plan = resolve_plan(BIG, capacity, strategy="block_expansion")
        assert plan.trainable_params <= capacity * BIG.n_params()
        assert plan.options["new_blocks"] >= last
        last = plan.options["new_blocks"]


def test_monotone_in_memory_and_always_fits():
    ranks = []
    for gb in [24, 26, 28, 32, 48, 80]:
        try:
            plan = resolve_plan(BIG, 0.05, hardware=gpu(gb), request=REQ, max_rank=1024)
        except PlanError:
            ranks.append(0)
            continue
        assert plan.fits is True
        assert plan.memory.total <= gpu(gb).training_budget_bytes()
        ranks.append(plan.options["rank"])
    assert ranks == sorted(ranks)
    assert ranks[0] < ranks[-1]  # memory really constrained the small GPUs


def test_refuses_when_nothing_fits_and_says_what_to_change():
    with pytest.raises(PlanError, match="fits 7.2 GiB") as err:
        resolve_plan(BIG, 0.01, hardware=gpu(8), request=REQ)
    assert "QLoRA" in str(err.value) and "shorten" in str(err.value)


def test_deterministic_and_explained():
    a = resolve_plan(TINY, 0.05, dataset_tokens=500_000)
    b = resolve_plan(TINY, 0.05, dataset_tokens=500_000)
    assert a.as_dict() == b.as_dict()
    for key in ("rank", "alpha", "dropout", "target_modules", "use_rslora", "memory"):
        assert a.reasons[key]
    assert a.options["dropout"] == 0.1  # small data
    assert a.to_lora_config().r == a.options["rank"]


def test_dataset_tokens_cap_the_budget():
    plenty = resolve_plan(BIG, 0.01)
    capped = resolve_plan(BIG, 0.01, dataset_tokens=5_000_000)
    assert capped.trainable_params <= 5_000_000 < plenty.trainable_params
    assert "dataset tokens" in capped.reasons["rank"]


def test_high_rank_switches_to_rslora():
    plan = resolve_plan(BIG, 0.1, max_rank=128)
    assert plan.options["rank"] >= 64 and plan.options["use_rslora"] is True


def test_unknown_memory_is_said_not_assumed():
    plan = resolve_plan(TINY, 0.05, hardware=HardwareProfile(accelerator="cpu"))
    assert plan.fits is None and plan.memory_budget_bytes is None
    assert "unknown" in plan.reasons["memory"]


def test_calibration_sums_to_the_budget_and_follows_sensitivity():
    rng = random.Random(7)
    names = [full for _, _, full in module_names(TINY)]
    sens = {n: rng.random() for n in names}
    budget = lora_params(TINY, 8, ALL_LINEAR)
    ranks, alphas = calibrate_rank_pattern(TINY, sens, budget, min_rank=2, max_rank=32, alpha_per_rank=2.0)
    shapes = TINY.linear_shapes()
    cost = {n: sum(shapes[n.rsplit(".", 1)[-1]]) for n in names}
    used = sum(ranks[n] * cost[n] for n in names)
    assert used <= budget
    assert budget - used < min(cost.values())  # nothing left that could buy another rank step
    assert all(2 <= r <= 32 for r in ranks.values())
    assert alphas == {n: 2.0 * r for n, r in ranks.items()}
    top, bottom = max(sens, key=sens.get), min(sens, key=sens.get)
    assert ranks[top] >= ranks[bottom]
    assert calibrate_rank_pattern(TINY, sens, budget, min_rank=2, max_rank=32) == (ranks, alphas)


def test_calibrated_plan_is_accepted_by_peft():
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaler_wizard.scaling.rank_resolver import measure_sensitivity

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"}))
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sens = measure_sensitivity(model, batches)
    assert set(sens) == {full for _, _, full in module_names(TINY)}
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    plan = resolve_plan(TINY, 0.2, sensitivities=sens, max_rank=64)
    peft_model = get_peft_model(model, plan.to_lora_config())
    assert peft_model.get_nb_trainable_parameters()[0] == plan.trainable_params
    assert plan.trainable_params <= lora_params(TINY, plan.options["rank"], ALL_LINEAR)


@pytest.mark.parametrize("capacity", [0, -0.1, 1.5, float("nan"), "big"])
def test_bad_capacity_is_a_clear_error(capacity):
    with pytest.raises(PlanError, match="capacity"):
        resolve_plan(TINY, capacity)


def test_capacity_too_small_for_anything():
    with pytest.raises(PlanError, match="Raise capacity"):
        resolve_plan(BIG, 1e-7)
    with pytest.raises(PlanError, match="less than one decoder block"):
        resolve_plan(BIG, 0.001, strategy="block_expansion")


def test_unreadable_model_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="config.json is not readable JSON"):
        read_model_dims(tmp_path)
    with pytest.raises(ModelLoadError, match="No model config"):
        read_model_dims(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="num_hidden_layers"):
        read_model_dims(tmp_path)


def test_rank_grid_and_memory_consistency():
    assert rank_grid(20) == [1, 2, 4, 8, 16]
    plan = resolve_plan(BIG, 0.01, hardware=gpu(80), request=REQ)
    # the plan's options, fed back through the strategy, give the same estimate the resolver checked
    again = estimate_memory(BIG, get_strategy("lora").plan(BIG, plan.options), plan.request)
    assert again.total == plan.memory.total
