"""Per-document attention (packing.enable_document_attention): on packed rows it computes what each
document computes alone -- logits and gradients equal transformers' own packed sdpa path -- and
anything that is not a packed training forward (padding masks, generation with a cache) is
unchanged."""

from __future__ import annotations

import pytest
import torch
from test_packing import ROW, _check_packed_logits, _docs, _tiny_llama

from scaler_wizard.errors import DataError
from scaler_wizard.packing import DOCUMENT_ATTENTION, enable_document_attention, pack_documents


def _batch(rows):
    return torch.utils.data.default_collate([rows[i] for i in range(len(rows))])


def test_documents_alone_and_same_gradients_as_stock_packed_sdpa():
    ours, stock = enable_document_attention(_tiny_llama()), _tiny_llama()
    assert ours.config._attn_implementation == DOCUMENT_ATTENTION
    docs = _docs()
    rows = pack_documents(docs, ROW, pad_id=0)
    batch = _batch(rows)
    assert len({tuple(r) for r in rows.seq_ids}) > 1  # rows with different boundaries: the grouped path
    _check_packed_logits(ours, rows, docs, lambda _: ours(input_ids=batch["input_ids"],
                                                          position_ids=batch["position_ids"], use_cache=False).logits)
    losses = []
    for model in (ours.train(), stock.train()):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    use_cache=False)
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for a, b in zip(ours.parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


def test_padding_masks_and_generation_take_the_stock_path():
    ours, stock = enable_document_attention(_tiny_llama()), _tiny_llama()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   stock(input_ids=ids, attention_mask=mask).logits)
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(ours.generate(prompt, max_new_tokens=4, do_sample=False),
                       stock.generate(prompt, max_new_tokens=4, do_sample=False))


def test_peft_model_and_sliding_window_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert enable_document_attention(model).get_base_model().config._attn_implementation == DOCUMENT_ATTENTION
    sliding = _tiny_llama()
    sliding.config.sliding_window = 8
    with pytest.raises(DataError, match="full-attention"):
        enable_document_attention(sliding)


def test_training_context_switches_only_packed_sdpa_models_and_restores():
    from scaler_wizard.packing import document_attention_for_training

    model = _tiny_llama()
    model.set_attn_implementation("sdpa")
    with document_attention_for_training(model, packed=True) as switched:
        assert switched and model.config._attn_implementation == DOCUMENT_ATTENTION
    assert model.config._attn_implementation == "sdpa"  # probes and the export see stock attention
    with document_attention_for_training(model, packed=False) as switched:
        assert not switched and model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with document_attention_for_training(model, packed=True) as switched:
        assert not switched and model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError), document_attention_for_training(model, packed=True):
        raise RuntimeError("a failed stage")
    assert model.config._attn_implementation == "sdpa"
