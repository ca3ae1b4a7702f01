"""The demo model's build mixture (scripts/build_demo_model.py): the copy and recall rows teach
what they claim to (labels on exactly the copied / recalled tokens), and the copy warm-up batch
has the shape the build log describes."""

import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
build = pytest.importorskip("build_demo_model")


@pytest.fixture(scope="module")
def mixture():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT / "src" / "scaler_wizard" / "assets" / "demo_model"))
    texts = [("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
             "and darkness was upon the face of the deep.")] * 40
    return tok, build.Mixture(tok, texts, seed=3, templates="mixed", stratify_depth=True)


def test_copy_row_labels_exactly_the_second_copy(mixture):
    _, mix = mixture
    mix.copy_alphabet_size = 64
    for _ in range(20):
        ids, labels = (t.tolist() for t in mix.copy_row())
        assert len(ids) == build.CONTEXT
        first_eos, second_eos = [i for i, t in enumerate(ids) if t == mix.eos][:2]
        seq = ids[first_eos + 1 : second_eos]
        n = len(seq)
        assert 8 <= n <= 60 and set(seq) <= set(mix.copy_order[:64])
        assert ids[second_eos + 1 : second_eos + 1 + n] == seq
        labelled = [i for i, v in enumerate(labels) if v != -100]
        assert labelled == list(range(second_eos + 1, second_eos + 1 + n))
        assert [labels[i] for i in labelled] == seq


def test_copy_alphabet_starts_with_the_digits(mixture):
    tok, mix = mixture
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert mix.copy_order[:10] == digits and mix.eos not in mix.copy_order
    assert len(set(mix.copy_order)) == len(mix.copy_order)


def test_recall_row_targets_the_digits_of_the_queried_word(mixture):
    _, mix = mixture
    mix.rng = random.Random(11)
    for _ in range(20):
        ids, labels = (t.tolist() for t in mix.recall_row())
        labelled = [i for i, v in enumerate(labels) if v != -100]
        assert len(labelled) == 5 and labelled == list(range(labelled[0], labelled[0] + 5))
        answer = [ids[i] for i in labelled]
        assert all(t in mix.recall_digits for t in answer)
        # the query is "word :" right before the answer; the same "word :" earlier is followed by it
        q = labelled[0]
        query = ids[q - 1 - len(mix.colon) : q]
        assert query[0] in mix.recall_words
        earlier = [i for i in range(q - len(query)) if ids[i : i + len(query)] == query]
        assert len(earlier) == 1
        j = earlier[0] + len(query)
        assert ids[j : j + 5] == answer


def test_copy_warmup_batch_is_short_copy_rows_only(mixture):
    _, mix = mixture
    ids, labels, kinds = mix.copy_warmup_batch(rows=8, length=64)
    assert ids.shape == labels.shape == (8, 64)
    assert torch.all(kinds == 2)
    assert (labels != -100).sum(dim=1).min() >= 8
