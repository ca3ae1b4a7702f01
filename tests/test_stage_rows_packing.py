"""Packed stage rows (``build_stage_rows(pack=True)``): the exact row budget, determinism, every
passkey example whole inside a row with its own positions, a per-token task, less padding -- and
the loss of a packed batch equal, token by token, to the loss of its examples run one by one."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import default_data_collator

from scaler_wizard.data import TASK_LM, TASK_PADDING, TASK_PASSKEY, StageRows, build_stage_rows
from scaler_wizard.distill.replay import NOT_REPLAY, mix_replay, sample_short_rows
from scaler_wizard.evaluation.passkey import PasskeyBuilder
from scaler_wizard.losses.chunked_ce import IGNORE_INDEX, chunked_token_ce, target_task, task_balanced_mean
from scaler_wizard.models import decoder_and_head as causal_lm_parts

PAD = 0
ROOT = Path(__file__).resolve().parents[1]


class RecordingBuilder:
    """A PasskeyBuilder that remembers every example it built, in order."""

    def __init__(self, tokenizer):
        self.inner = PasskeyBuilder(tokenizer, tokenizer.bos_token_id)
        self.built = []

    def min_length(self):
        return self.inner.min_length()

    def build(self, length, depth, key):
        ex = self.inner.build(length, depth, key)
        self.built.append(ex)
        return ex


@pytest.fixture(scope="module")
def demo_tokenizer():
    # the shipped demo tokenizer: its passkey text fits the 64-token minimum example length
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ROOT / "src" / "scaler_wizard" / "assets" / "demo_model"))


@pytest.fixture(scope="module")
def stream(demo_tokenizer):
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, len(demo_tokenizer), (5000,), generator=g).tolist()


def rows_for(demo_tokenizer, stream, *, length=256, n_rows=24, share=0.5, seed=11, pack=True):
    builder = RecordingBuilder(demo_tokenizer)
    rows = build_stage_rows(stream, length, n_rows, passkey_share=share, passkey_builder=builder, pad_id=PAD,
                            seed=seed, pack=pack)
    return rows, builder


def segments(position_ids):
    """(start, end) of each run of consecutive positions restarting at 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(itertools.pairwise(starts))


@pytest.mark.parametrize("n_rows,share,length", [(24, 0.5, 256), (10, 0.4, 128), (7, 1.0, 96), (5, 0.0, 64), (0, 0.5, 64)])
def test_exact_row_count_and_layout(demo_tokenizer, stream, n_rows, share, length):
    rows, _ = rows_for(demo_tokenizer, stream, length=length, n_rows=n_rows, share=share)
    assert rows.packed and rows.attention_mask is None
    assert len(rows) == n_rows
    for r in range(n_rows):
        assert len(rows.input_ids[r]) == len(rows.labels[r]) == len(rows.position_ids[r]) == len(rows.task[r]) == length
        assert set(rows.task[r]) <= {TASK_LM, TASK_PASSKEY, TASK_PADDING}
    pk_rows = sum(TASK_PASSKEY in t for t in rows.task)
    assert pk_rows == round(n_rows * share)  # the recipe's share of rows (= of compute) is kept
    assert sum(t == [TASK_LM] * length for t in rows.task) == n_rows - pk_rows


def test_deterministic_for_a_seed(demo_tokenizer, stream):
    a, _ = rows_for(demo_tokenizer, stream, seed=3)
    b, _ = rows_for(demo_tokenizer, stream, seed=3)
    c, _ = rows_for(demo_tokenizer, stream, seed=4)
    assert a == b
    assert a.input_ids != c.input_ids


def test_every_passkey_example_is_whole_in_one_row(demo_tokenizer, stream):
    length, n_rows, share = 256, 24, 0.5
    rows, builder = rows_for(demo_tokenizer, stream, length=length, n_rows=n_rows, share=share)
    found = []
    for r in range(len(rows)):
        pos, ids, labels, task = rows.position_ids[r], rows.input_ids[r], rows.labels[r], rows.task[r]
        for start, end in segments(pos):
            assert pos[start:end] == list(range(end - start))  # positions restart at 0 per example
            assert labels[start] == IGNORE_INDEX  # no target crosses a document boundary
            kinds = set(task[start:end])
            assert len(kinds) == 1  # one example = one task
            kind = kinds.pop()
            if kind == TASK_PASSKEY:
                found.append((r, ids[start:end], labels[start:end]))
            elif kind == TASK_LM:
                assert (start, end) == (0, length)
                assert any(stream[s : s + length] == ids for s in range(len(stream) - length + 1) if stream[s] == ids[0])
                assert labels[1:] == ids[1:]
            else:  # the padding tail: last segment, nothing supervised
                assert end == length and set(labels[start:end]) == {IGNORE_INDEX}
                assert set(ids[start:end]) == {PAD}
    # every example drawn is in the rows, whole and in draw order, except the last draw (it fitted
    # in no row: the fill stops there so the examples stay a prefix of the random sequence)
    assert len(found) == len(builder.built) - 1
    n_passkey = round(n_rows * share)
    assert len(found) > n_passkey  # more examples than one per row (unpacked trains n_passkey)
    assert rows.examples_per_task() == {TASK_LM: n_rows - n_passkey, TASK_PASSKEY: len(found)}
    by_tokens = {}
    for _, ids, labels in found:
        by_tokens.setdefault(tuple(ids), []).append(labels)
    for ex in builder.built[:-1]:
        labels = by_tokens[tuple(ex.input_ids)].pop()
        n_prompt = len(ex.prompt_ids)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # completion-only labels kept
        assert labels[n_prompt:] == ex.answer_ids


def test_padding_fraction_counts_the_padding_tail_and_beats_unpacked(demo_tokenizer, stream):
    packed, _ = rows_for(demo_tokenizer, stream, seed=5)
    padded, _ = rows_for(demo_tokenizer, stream, seed=5, pack=False)
    total = sum(len(r) for r in packed.input_ids)
    tail = 0
    for pos, task in zip(packed.position_ids, packed.task):
        start, end = segments(pos)[-1]
        if task[start] == TASK_PADDING:  # the last segment is padding when the row has room left
            tail += end - start
    assert packed.padding_fraction == pytest.approx(tail / total)
    assert 0 < packed.padding_fraction < padded.padding_fraction
    assert not padded.packed and padded.padding_fraction > 0.15


def test_items_and_default_collator(demo_tokenizer, stream):
    rows, _ = rows_for(demo_tokenizer, stream, length=128, n_rows=8)
    batch = default_data_collator([rows[i] for i in range(4)])  # what the Trainer uses
    assert set(batch) == {"input_ids", "labels", "position_ids", "task"}
    assert batch["position_ids"].shape == batch["task"].shape == (4, 128)
    padded, _ = rows_for(demo_tokenizer, stream, length=128, n_rows=8, pack=False)
    assert set(padded[0]) == {"input_ids", "labels", "attention_mask", "task"} and padded[0]["task"].dim() == 0


def _tiny_llama(vocab_size, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def _token_loss(model, batch):
    """The per-token loss of ScalingTrainer.compute_loss: [b, t-1], target t+1 at position t."""
    decoder, head = causal_lm_parts(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                     position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    return chunked_token_ce(hidden[:, :-1], head.weight, batch["labels"][:, 1:], bias=head.bias, chunk_size=50)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_loss_equals_examples_one_by_one(demo_tokenizer, stream, attn):
    """No cross-document attention: each example's per-token loss inside the packed batch is its
    loss run alone, and the task-balanced mean is the per-task mean over those examples."""
    length = 256
    model = _tiny_llama(len(demo_tokenizer), attn)
    rows, _ = rows_for(demo_tokenizer, stream, length=length, n_rows=8, share=0.75, seed=5)
    mixed = mix_replay(rows, sample_short_rows(stream, 40, 2, seed=1), 0.25, pad_id=PAD, seed=0)
    assert mixed.packed and sum(r != NOT_REPLAY for r in mixed.replay_index) == 2
    batch = default_data_collator([mixed[i] for i in range(len(mixed))])
    with torch.no_grad():
        packed = _token_loss(model, batch)
        sums, counts, checked = {}, {}, 0
        for r in range(len(mixed)):
            for start, end in segments(mixed.position_ids[r]):
                kind = mixed.task[r][start]
                if kind == TASK_PADDING:
                    continue
                ids = torch.tensor([mixed.input_ids[r][start:end]])
                labels = torch.tensor([mixed.labels[r][start:end]])
                alone = _token_loss(model, {"input_ids": ids, "labels": labels})[0]
                # position t predicts t+1: the example's own predictions are start .. end-2
                torch.testing.assert_close(packed[r, start : end - 1], alone, atol=2e-5, rtol=1e-5)
                if end < length:  # its last token predicts the next example's first: not a target
                    assert packed[r, end - 1] == 0
                n = int((labels[0, 1:] != IGNORE_INDEX).sum())
                sums[kind] = sums.get(kind, 0.0) + float(alone.sum())
                counts[kind] = counts.get(kind, 0) + n
                checked += 1
        assert checked >= len(mixed) + 2  # rows really hold several examples
        expected = sum(sums[k] / counts[k] for k in sums)
        loss = task_balanced_mean(packed, batch["labels"][:, 1:], target_task(batch["task"]))
        assert float(loss) == pytest.approx(expected, rel=1e-5)

        # guard: the same rows without their position ids (one causal block per row) differ
        leaky = _token_loss(model, {k: v for k, v in batch.items() if k != "position_ids"})
    assert (leaky - packed).abs().max() > 1e-3


def test_task_balanced_mean_per_token_equals_per_row_for_single_task_rows():
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(5, 9, generator=g)
    labels = torch.randint(0, 7, (5, 9), generator=g)
    labels[torch.rand(5, 9, generator=g) < 0.4] = IGNORE_INDEX
    task = torch.tensor([0, 1, 1, 0, 1])
    per_row = task_balanced_mean(loss, labels, task)
    per_token = task_balanced_mean(loss, labels, task[:, None].expand(5, 9).clone())
    torch.testing.assert_close(per_token, per_row)
    # a row mixing tasks: each token counts for its own task; padding (-1) never counts
    mixed_task = torch.tensor([[0] * 4 + [1] * 3 + [TASK_PADDING] * 2])
    mixed_loss = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 99.0, 99.0]])
    mixed_labels = torch.tensor([[IGNORE_INDEX, 1, 1, 1, IGNORE_INDEX, 1, 1, 1, IGNORE_INDEX]])
    assert float(task_balanced_mean(mixed_loss, mixed_labels, mixed_task)) == pytest.approx(3.0 + 25.0)
    assert task_balanced_mean(loss, labels, None) == pytest.approx(
        float((loss * (labels != IGNORE_INDEX)).sum() / (labels != IGNORE_INDEX).sum()))


def test_target_task_aligns_per_token_task_with_shifted_labels():
    task = torch.tensor([[0, 0, 1, 1, -1]])
    assert torch.equal(target_task(task), torch.tensor([[0, 1, 1, -1]]))
    per_row = torch.tensor([0, 1])
    assert target_task(per_row) is per_row and target_task(None) is None
    with pytest.raises(ValueError, match=r"target_task"):
        task_balanced_mean(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.long), task)


def test_replay_into_packed_rows(demo_tokenizer, stream):
    rows, _ = rows_for(demo_tokenizer, stream, length=128, n_rows=10)
    short = sample_short_rows(stream, 32, 4, seed=2)
    mixed = mix_replay(rows, short, 0.3, pad_id=PAD, seed=1)
    assert len(mixed) == 10 and mixed.packed and mixed.attention_mask is None
    kept = [i for i, r in enumerate(mixed.replay_index) if r == NOT_REPLAY]
    assert [mixed.input_ids[i] for i in kept] == rows.input_ids[: len(kept)]
    assert [mixed.task[i] for i in kept] == rows.task[: len(kept)]
    for i, src in enumerate(mixed.replay_index):
        if src == NOT_REPLAY:
            continue
        assert mixed.input_ids[i] == short[src] + [PAD] * 96
        assert mixed.labels[i] == short[src] + [IGNORE_INDEX] * 96
        assert mixed.position_ids[i] == list(range(32)) + list(range(96))
        assert mixed.task[i] == [TASK_LM] * 32 + [TASK_PADDING] * 96
    item = mixed[mixed.replay_index.index(next(r for r in mixed.replay_index if r != NOT_REPLAY))]
    assert set(item) == {"input_ids", "labels", "position_ids", "task", "replay_index"}
    batch = default_data_collator([mixed[i] for i in range(len(mixed))])
    assert batch["position_ids"].shape == (10, 128) and "attention_mask" not in batch
    # padding of the replay rows counts as padding
    extra = sum(96 for r in mixed.replay_index if r != NOT_REPLAY)
    replaced_pad = sum(rows.task[i].count(TASK_PADDING) for i in range(len(rows)) if i >= len(kept))
    expected = (sum(r.count(TASK_PADDING) for r in rows.task) - replaced_pad + extra) / (10 * 128)
    assert mixed.padding_fraction == pytest.approx(expected)


def test_unpacked_rows_unchanged(demo_tokenizer, stream):
    rows, builder = rows_for(demo_tokenizer, stream, length=128, n_rows=10, pack=False)
    assert isinstance(rows, StageRows) and not rows.packed and rows.position_ids is None
    assert all(isinstance(t, int) for t in rows.task)
    assert len(builder.built) == rows.examples_per_task()[TASK_PASSKEY] == 5
