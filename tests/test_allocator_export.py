"""The CPU allocator tuning and the export's logit check at sampled positions."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scaler_wizard import allocator
from scaler_wizard.errors import ExportError
from scaler_wizard.models import EXPORT_CHECK_POSITIONS, _logits_at, export_merged
from scaler_wizard.scaling.memory import MemoryRequest, estimate_memory


def _tiny(**rope):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, **rope)
    return LlamaForCausalLM(cfg).eval()


def test_logits_at_positions_equal_full_logits():
    model = _tiny()
    ids = torch.randint(0, 97, (1, 50))
    pos = torch.tensor([0, 7, 49])
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert torch.allclose(_logits_at(model, ids, pos), full[:, pos], atol=1e-5)


class _Tok:
    def save_pretrained(self, path):
        pass


def test_export_check_covers_the_window_and_catches_a_wrong_position_encoding(tmp_path, monkeypatch):
    model = _tiny(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 64})
    stream = list(range(1, 97)) * 4
    check = export_merged(model, _Tok(), tmp_path / "model", stream, 256, "float32")
    assert check["tokens"] == 256 and check["positions_compared"] == EXPORT_CHECK_POSITIONS
    assert check["max_abs_logit_diff"] < 1e-5
    # a saved config that lost the rope scaling is seen by the check
    real_save = LlamaForCausalLM.save_pretrained

    def lossy_save(self, path, **kw):
        self.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        real_save(self, path, **kw)

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", lossy_save)
    with pytest.raises(ExportError, match="differs from the trained model"):
        export_merged(_tiny(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                             "original_max_position_embeddings": 64}),
                      _Tok(), tmp_path / "model2", stream, 256, "float32")
    assert not (tmp_path / "model2").exists()  # never published


def test_planner_counts_the_export_reload():
    from scaler_wizard.scaling.memory import ModelDims, StrategyPlan

    dims = ModelDims(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                     num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    plan = StrategyPlan(strategy="lora", lora_rank=8)
    with_export = estimate_memory(dims, plan, MemoryRequest(seq_len=256, dtype="float32", backend="cpu"))
    without = estimate_memory(dims, plan, MemoryRequest(seq_len=256, dtype="float32", backend="cpu",
                                                        merge_export=False))
    assert with_export.export == dims.n_params(0) * 4 and without.export == 0
    assert with_export.total == max(with_export.step_total, with_export.probe_total, with_export.export_total)
    assert with_export.total > without.total  # at a short length the fp32 reload is the peak


def test_allocator_respects_the_users_malloc_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert allocator.tune_cpu_allocator() is False
