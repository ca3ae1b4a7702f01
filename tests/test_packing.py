"""Sequence packing: a packed row computes exactly what its documents compute alone, position
ids restart per document, and the padding-waste arithmetic is right."""

from __future__ import annotations

import pytest
import torch

from scaler_wizard.errors import DataError
from scaler_wizard.packing import (
    IGNORE_INDEX,
    PADDING_TASK,
    FirstFitRows,
    MaskMode,
    block_causal_mask,
    length_grouped_batches,
    pack_documents,
    padding_waste,
    plan_bins,
)

DOC_LENGTHS = [7, 3, 12, 5, 1, 9]
ROW = 16


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def _docs():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in DOC_LENGTHS]


def _segments(row_seq_ids):
    """(segment id, start, end) for each run of equal ids in a row."""
    out, start = [], 0
    for k in range(1, len(row_seq_ids) + 1):
        if k == len(row_seq_ids) or row_seq_ids[k] != row_seq_ids[start]:
            out.append((row_seq_ids[start], start, k))
            start = k
    return out


def _check_packed_logits(model, rows, docs, call):
    """Every document's logits inside the packed batch equal its logits run alone."""
    with torch.no_grad():
        packed = call(rows)
        alone = {tuple(d): model(input_ids=torch.tensor([d])).logits[0] for d in docs}
    checked = 0
    for r in range(len(rows)):
        for seg, start, end in _segments(rows.seq_ids[r]):
            if seg == rows.docs_per_row[r]:  # the padding tail
                continue
            doc = tuple(rows.input_ids[r][start:end])
            torch.testing.assert_close(packed[r, start:end], alone[doc], atol=1e-5, rtol=0)
            checked += 1
    assert checked == len(docs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked_position_ids(attn):
    model = _tiny_llama()
    model.config._attn_implementation = attn
    docs = _docs()
    rows = pack_documents(docs, ROW, pad_id=0)
    assert len(rows) < len(docs)  # something was actually packed together
    batch = torch.utils.data.default_collate([rows[i] for i in range(len(rows))])
    assert "attention_mask" not in batch  # transformers infers the document blocks from position_ids
    # With a KV cache transformers skips the packed-sequence detection: the test must see that too.
    with torch.no_grad():
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        uncached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert (cached - uncached).abs().max() > 1e-3
    _check_packed_logits(model, rows, docs,
                         lambda _: model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                                  use_cache=False).logits)


def test_packed_logits_equal_unpacked_block_4d_mask():
    model = _tiny_llama()
    docs = _docs()
    rows = pack_documents(docs, ROW, pad_id=0, mask_mode=MaskMode.BLOCK_4D)
    batch = torch.utils.data.default_collate([rows[i] for i in range(len(rows))])
    assert batch["attention_mask"].shape == (len(rows), 1, ROW, ROW)
    # Without restarted position ids: RoPE is relative, so the block mask alone suffices.
    _check_packed_logits(model, rows, docs,
                         lambda _: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)


def test_cross_document_attention_would_change_logits():
    """Guard that the equality test can fail: a plain causal mask over the packed row differs."""
    model = _tiny_llama()
    docs = _docs()
    rows = pack_documents(docs, ROW, pad_id=0)
    row = next(r for r in range(len(rows)) if rows.docs_per_row[r] > 1)
    _, start, end = _segments(rows.seq_ids[row])[1]
    with torch.no_grad():
        leaky = model(input_ids=torch.tensor([rows.input_ids[row]])).logits[0, start:end]
        alone = model(input_ids=torch.tensor([rows.input_ids[row][start:end]])).logits[0]
    assert (leaky - alone).abs().max() > 1e-3


def test_position_ids_restart_and_labels_do_not_cross_documents():
    docs = _docs()
    rows = pack_documents(docs, ROW, pad_id=0)
    assert sum(rows.docs_per_row) == len(docs)
    for r in range(len(rows)):
        assert len(rows.input_ids[r]) == len(rows.position_ids[r]) == len(rows.labels[r]) == ROW
        for seg, start, end in _segments(rows.seq_ids[r]):
            assert rows.position_ids[r][start:end] == list(range(end - start))
            assert rows.labels[r][start] == IGNORE_INDEX
            if seg < rows.docs_per_row[r]:
                assert rows.labels[r][start + 1 : end] == rows.input_ids[r][start + 1 : end]
            else:
                assert set(rows.labels[r][start:end]) == {IGNORE_INDEX}
                assert set(rows.input_ids[r][start:end]) == {0}
    # every document appears exactly once
    packed_docs = sorted(
        tuple(rows.input_ids[r][s:e]) for r in range(len(rows)) for seg, s, e in _segments(rows.seq_ids[r])
        if seg < rows.docs_per_row[r]
    )
    assert packed_docs == sorted(tuple(d) for d in docs)


def test_long_documents_are_split_and_custom_labels_kept():
    doc = list(range(1, 41))  # 40 tokens, rows of 16 -> pieces 16, 16, 8
    labels = [IGNORE_INDEX] * 10 + doc[10:]
    rows = pack_documents([doc], ROW, pad_id=0, labels=[labels], task=1)
    assert sorted(rows.real_tokens) == [8, 16, 16]
    assert rows.task == [1, 1, 1]
    flat = [t for r in range(len(rows)) for t in rows.input_ids[r][: rows.real_tokens[r]]]
    assert sorted(flat) == doc
    item = rows[0]
    assert int(item["task"]) == 1 and "position_ids" in item


def test_block_causal_mask_blocks():
    seq = torch.tensor([[0, 0, 1, 1, 1, 2]])
    allowed = block_causal_mask(seq)[0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_padding_waste_figures():
    lengths = [10, 6, 4, 2]  # 22 real tokens, rows of 10, batches of 2
    w = padding_waste(lengths, 10, 2)
    assert w.real_tokens == 22
    assert w.fixed == pytest.approx(1 - 22 / 40)
    assert w.longest == pytest.approx(1 - 22 / (2 * 10 + 2 * 4))  # batches [10,6] and [4,2]
    assert w.packed_rows == 3  # FFD: [10], [6,4], [2]
    assert w.packed == pytest.approx(1 - 22 / 30)
    rows = pack_documents([[1] * n for n in lengths], 10, pad_id=0)
    assert rows.padding_fraction == pytest.approx(w.packed)
    grouped = padding_waste(lengths, 10, 2, batches=[[0, 1], [2, 3]])
    assert grouped.longest == w.longest


def test_first_fit_decreasing_and_length_grouping():
    assert plan_bins([5, 5, 5, 3, 3, 3], 8) == [[0, 3], [1, 4], [2, 5]]
    lengths = [3, 50, 4, 48, 5, 47, 2, 49]
    batches = length_grouped_batches(lengths, 2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    for b in batches:  # long documents end up with long ones
        assert len({lengths[i] > 10 for i in b}) == 1
    assert batches == length_grouped_batches(lengths, 2, seed=0)


def test_bad_inputs_name_the_problem():
    with pytest.raises(DataError, match="empty"):
        pack_documents([[1, 2], []], 8, pad_id=0)
    with pytest.raises(DataError, match="labels"):
        pack_documents([[1, 2, 3]], 8, pad_id=0, labels=[[1, 2]])
    with pytest.raises(DataError, match="row_length"):
        padding_waste([3], 0, 1)
    with pytest.raises(DataError, match="more than"):
        plan_bins([9], 8)


def _first_fit_by_scan(lengths, n_rows, row_length):
    """Reference: the plain O(rows) scan, stopping at the first document that fits nowhere."""
    free, rows = [row_length] * n_rows, [[] for _ in range(n_rows)]
    for j, n in enumerate(lengths):
        r = next((r for r in range(n_rows) if free[r] >= n), None)
        if r is None:
            break
        free[r] -= n
        rows[r].append(j)
    return rows


@pytest.mark.parametrize("n_rows", [1, 3, 5, 8, 13])
def test_first_fit_rows_matches_a_plain_scan(n_rows):
    import random

    rng = random.Random(n_rows)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    filler = FirstFitRows(n_rows, 50)
    for n in lengths:
        if filler.place(n) is None:
            break
    assert filler.plan == _first_fit_by_scan(lengths, n_rows, 50)
    assert all(filler.plan)  # an empty row fits anything: no row is empty at the first miss
    for r, members in enumerate(filler.plan):
        assert filler.free(r) == 50 - sum(lengths[j] for j in members)
    assert filler.documents == sum(len(m) for m in filler.plan)


def test_first_fit_rows_edges():
    filler = FirstFitRows(2, 10)
    assert [filler.place(n) for n in (6, 6, 4, 4, 1)] == [0, 1, 0, 1, None]
    assert filler.plan == [[0, 2], [1, 3]]
    assert FirstFitRows(0, 10).place(1) is None
    with pytest.raises(DataError, match="empty"):
        FirstFitRows(1, 10).place(0)
    with pytest.raises(DataError, match="row_length"):
        FirstFitRows(1, 0)


def test_pack_documents_with_a_plan_and_tasks_per_document():
    docs = [[1] * 3, [2] * 3, [3] * 8, [4] * 2]
    rows = pack_documents(docs, 8, pad_id=0, plan=[[2], [1, 3, 0]], doc_tasks=[0, 1, 0, 1])
    assert rows.input_ids == [[3] * 8, [2, 2, 2, 4, 4, 1, 1, 1]]  # the plan's rows, in its order
    assert rows.token_task == [[0] * 8, [1, 1, 1, 1, 1, 0, 0, 0]]
    assert rows.position_ids[1] == [0, 1, 2, 0, 1, 0, 1, 2]
    rows = pack_documents([[5] * 3, [6] * 2], 8, pad_id=9, plan=[[0, 1]], doc_tasks=[1, 0])
    assert rows.input_ids == [[5, 5, 5, 6, 6, 9, 9, 9]]
    assert rows.token_task == [[1, 1, 1, 0, 0] + [PADDING_TASK] * 3]
    assert rows.labels == [[IGNORE_INDEX, 5, 5, IGNORE_INDEX, 6] + [IGNORE_INDEX] * 3]
    item = rows[0]
    assert item["task"].tolist() == rows.token_task[0] and "attention_mask" not in item


@pytest.mark.parametrize("kwargs,match", [
    ({"plan": [[0, 1], [1]]}, "appears 2 times"),
    ({"plan": [[0]]}, "appears 0 times"),
    ({"plan": [[0], [1], []]}, "empty"),
    ({"plan": [[0], [7]]}, "names document 7"),
    ({"plan": [[0, 1]], "row_length": 6}, "more than a 6-token row"),
    ({"task": 1, "doc_tasks": [0, 1]}, "both"),
    ({"doc_tasks": [0]}, "2 documents but 1 task ids"),
])
def test_bad_plans_and_tasks_name_the_problem(kwargs, match):
    row_length = kwargs.pop("row_length", 8)
    with pytest.raises(DataError, match=match):
        pack_documents([[1] * 4, [2] * 3], row_length, pad_id=0, **kwargs)
    with pytest.raises(DataError, match="cannot split"):
        pack_documents([[1] * 9], 8, pad_id=0, plan=[[0]])
