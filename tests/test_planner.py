"""Memory planner and hardware profiles (pure arithmetic; the measured comparison is
bench/planner_accuracy.py)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from scaler_wizard.errors import InputError, PlanError
from scaler_wizard.recipe import resolve_path
from scaler_wizard.scaling.hardware import (
    HardwareProfile,
    detect_hardware,
    gpu_profile,
    load_hardware_profile,
)
from scaler_wizard.scaling.memory import (
    NF4_BYTES_PER_WEIGHT,
    MemoryRequest,
    ModelDims,
    StrategyPlan,
    estimate_memory,
    max_seq_len,
    read_model_dims,
)

LLAMA_8B = read_model_dims(resolve_path("builtin:assets/model_configs/Llama-3.1-8B"))
TINY = ModelDims.from_config({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128})
LORA = StrategyPlan(strategy="lora", lora_rank=16)
REQ = MemoryRequest(seq_len=8192, micro_batch=1, dtype="bfloat16", gradient_checkpointing=True, loss_chunk=1024)


def test_shipped_configs_have_the_published_parameter_counts():
    counts = {name: read_model_dims(resolve_path(f"builtin:assets/model_configs/{name}")).n_params() / 1e9
              for name in ("Llama-3.2-1B", "Llama-3.1-8B", "Mistral-7B-v0.1", "Qwen2.5-7B")}
    # model cards: 1.24B, 8.03B, 7.24B, 7.61B
    assert counts == pytest.approx({"Llama-3.2-1B": 1.24, "Llama-3.1-8B": 8.03, "Mistral-7B-v0.1": 7.24,
                                    "Qwen2.5-7B": 7.62}, abs=0.01)


def test_breakdown_is_consistent():
    est = estimate_memory(LLAMA_8B, LORA, REQ)
    parts = est.breakdown_gb()
    assert all(v >= 0 for v in parts.values())
    assert est.step_total == (est.weights + est.trainable + est.activations + max(est.logits, est.backward)
                              + est.teacher + est.overhead)
    # probes run between steps without gradients: the peak is the larger of the two
    assert est.probe_total == est.weights + est.trainable + est.probe + est.overhead
    assert est.total == max(est.step_total, est.probe_total, est.export_total) == est.step_total
    # on an accelerator the export's fp32 reload is host RAM: noted, not in the device's peak
    assert est.export == 0 and any("merged export" in n for n in est.notes)
    assert 0 < est.probe < est.activations + est.logits
    assert est.backward > 0  # the recomputed layer
    assert est.weights == LLAMA_8B.n_params() * 2  # bf16
    assert est.teacher == 0
    # LoRA r=16 on all linear layers of Llama-3.1-8B: 41.9M parameters x 20 bytes
    assert est.trainable == pytest.approx(41_943_040 * 20)


def test_qlora_weights_are_about_a_quarter():
    q = estimate_memory(LLAMA_8B, LORA, replace(REQ, quantization="4bit"))
    full = estimate_memory(LLAMA_8B, LORA, REQ)
    assert q.weights < 0.4 * full.weights
    assert NF4_BYTES_PER_WEIGHT == pytest.approx(4.127 / 8, abs=1e-3)
    with pytest.raises(PlanError, match="4-bit"):
        estimate_memory(LLAMA_8B, StrategyPlan(strategy="full"), replace(REQ, quantization="4bit"))


def test_chunked_loss_shrinks_logits_memory():
    stock = estimate_memory(LLAMA_8B, LORA, replace(REQ, seq_len=65536, loss_chunk=None, dtype="float32"))
    chunked = estimate_memory(LLAMA_8B, LORA, replace(REQ, seq_len=65536, loss_chunk=1024, dtype="float32"))
    # REFERENCES.md: one fp32 copy of the logits at 64K tokens x 128,256 is 33.6 GB; the stock loss
    # holds three at its peak (log-softmax, its gradient, the logits' gradient)
    assert stock.logits == 65536 * 128256 * 12
    assert stock.logits / 3 == pytest.approx(33.6e9, rel=0.01)
    assert chunked.logits == 1024 * 128256 * 12
    assert chunked.total < stock.total - 60e9
    assert chunked.activations == stock.activations


def test_checkpointing_shrinks_activations():
    on = estimate_memory(LLAMA_8B, LORA, REQ)
    off = estimate_memory(LLAMA_8B, LORA, replace(REQ, gradient_checkpointing=False))
    assert on.activations < off.activations / 10
    assert on.backward > off.backward  # the price: one layer recomputed at a time
    assert on.total < off.total
    assert on.weights == off.weights and on.logits == off.logits


def test_eager_attention_grows_quadratically():
    sdpa = [estimate_memory(TINY, LORA, replace(REQ, seq_len=s, gradient_checkpointing=False)).activations
            for s in (1024, 2048)]
    eager = [estimate_memory(TINY, LORA, replace(REQ, seq_len=s, gradient_checkpointing=False,
                                                attn_implementation="eager")).activations for s in (1024, 2048)]
    assert sdpa[1] == pytest.approx(2 * sdpa[0], rel=0.01)
    assert eager[1] > 3.5 * eager[0]


def test_teacher_modes_and_block_expansion():
    none = estimate_memory(LLAMA_8B, LORA, REQ)
    base = estimate_memory(LLAMA_8B, LORA, replace(REQ, teacher="base"))
    other = estimate_memory(LLAMA_8B, LORA, replace(REQ, teacher="model", teacher_dims=LLAMA_8B))
    assert 0 == none.teacher < base.teacher < other.teacher
    assert other.teacher - base.teacher == LLAMA_8B.n_params() * 2  # a second copy of the weights
    with pytest.raises(PlanError, match="teacher_dims"):
        estimate_memory(LLAMA_8B, LORA, replace(REQ, teacher="model"))
    grown = estimate_memory(LLAMA_8B, StrategyPlan(strategy="block_expansion", new_blocks=8), REQ)
    assert grown.weights == LLAMA_8B.n_params(8) * 2
    assert grown.trainable > none.trainable


def test_bad_requests_are_named():
    with pytest.raises(PlanError, match="seq_len"):
        estimate_memory(TINY, LORA, replace(REQ, seq_len=0))
    with pytest.raises(PlanError, match="loss_chunk"):
        estimate_memory(TINY, LORA, replace(REQ, loss_chunk=0))


def test_max_seq_len_is_monotone_and_fits():
    lengths = []
    for gb in (16, 24, 40, 80):
        budget = gb * 2**30
        n = max_seq_len(LLAMA_8B, LORA, REQ, budget)
        assert n == 0 or estimate_memory(LLAMA_8B, LORA, replace(REQ, seq_len=n)).total <= budget
        assert estimate_memory(LLAMA_8B, LORA, replace(REQ, seq_len=n + 256)).total > budget
        lengths.append(n)
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


# ------------------------------------------------------------------------------------------
# hardware
# ------------------------------------------------------------------------------------------


def test_detected_hardware_invents_nothing(tmp_path):
    hw = detect_hardware(tmp_path / "not-yet-created")
    assert hw.source == "detected"
    assert hw.cpu_cores == os.cpu_count()
    assert hw.disk_free_gb is not None and hw.disk_free_gb > 0
    if hw.accelerator == "cpu":
        assert hw.gpus == [] and hw.device_memory_bytes() == pytest.approx(hw.ram_available_gb * 2**30)
    json.loads(hw.model_dump_json())


def test_unknown_hardware_is_handled():
    hw = HardwareProfile(accelerator="cpu")
    assert hw.device_memory_bytes() is None and hw.training_budget_bytes() is None
    assert ("RAM total", "unknown") in hw.summary_rows()
    assert estimate_memory(TINY, LORA, REQ).fits(hw.training_budget_bytes()) is None
    unknown_gpu = HardwareProfile(accelerator="cuda", gpus=[{"name": "mystery"}])
    assert unknown_gpu.device_memory_bytes() is None and unknown_gpu.supports_bf16() is None
    assert not unknown_gpu.can_qlora()


def test_profile_from_file(tmp_path):
    (tmp_path / "hw.yaml").write_text(
        "accelerator: cuda\nbitsandbytes: true\ngpus:\n  - {name: A100, total_memory_gb: 80, bf16: true}\n"
        "  - {name: A100, total_memory_gb: 40, bf16: true}\n", encoding="utf-8")
    hw = load_hardware_profile(tmp_path / "hw.yaml")
    assert hw.source == "file" and hw.gpu_count == 2 and hw.can_qlora()
    assert hw.device_memory_bytes() == 40 * 2**30  # data parallel: the smallest GPU decides
    (tmp_path / "hw.json").write_text(gpu_profile("H100", 80).model_dump_json(), encoding="utf-8")
    assert load_hardware_profile(tmp_path / "hw.json").gpus[0].name == "H100"
    (tmp_path / "bad.yaml").write_text("accelerator: cuda\n", encoding="utf-8")
    with pytest.raises(InputError, match="gpus"):
        load_hardware_profile(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("acelerator: cpu\n", encoding="utf-8")
    with pytest.raises(InputError, match="acelerator"):
        load_hardware_profile(tmp_path / "typo.yaml")
    with pytest.raises(InputError, match="not found"):
        load_hardware_profile(tmp_path / "missing.yaml")
