"""The tokenized-corpus cache (``corpus.py``): the same tokens as the in-memory stream, read back
without tokenizing again, a key that follows the file bytes and the tokenizer, never a half-built
folder, windows inside documents, per-source long-document upsampling, one tokenization for
several processes, and the wiring into a run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import DEMO_DATA, write_recipe

from scaler_wizard import corpus as corpus_mod
from scaler_wizard.corpus import (
    CorpusSampler,
    corpus_key,
    describe_sources,
    long_document_upsampling,
    open_corpus,
    tokenize_corpus,
)
from scaler_wizard.data import build_stage_rows, load_texts, token_stream
from scaler_wizard.errors import DataError

DEMO_MODEL = Path(__file__).resolve().parents[1] / "src" / "scaler_wizard" / "assets" / "demo_model"
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at "  # noqa: SIM905
         "which").split()


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def demo_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def write_jsonl(path: Path, lengths: list[int], seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n"
                      for i, n in enumerate(lengths))
    return path


class WordTokenizer:
    """A stand-in without ``backend_tokenizer`` and with a vocabulary too large for uint16."""

    eos_token_id = 1
    special_tokens_map: ClassVar[dict[str, str]] = {"eos_token": "</s>"}

    def __len__(self) -> int:
        return 70_000

    def get_vocab(self) -> dict[str, int]:
        return {w: 69_000 + i for i, w in enumerate(WORDS)}

    def __call__(self, texts, add_special_tokens=False):
        vocab = self.get_vocab()
        return {"input_ids": [[vocab.get(w, 2) for w in t.split()] for t in texts]}


def test_tokens_match_the_in_memory_stream_and_the_cache_is_read_back(tmp_path, demo_tok, monkeypatch):
    src = DEMO_DATA / "heldout.jsonl"
    first = tokenize_corpus([src], "text", demo_tok, tmp_path / "cache", num_proc=1)
    assert first.built and first.tokens.dtype == np.uint16 and first.meta["dtype"] == "uint16"
    assert np.array_equal(np.asarray(first.tokens), token_stream(demo_tok, load_texts([src], "text")))
    assert first.num_docs() == 60 and first.doc_offsets[-1] == first.num_tokens()
    assert first.doc(3)[-1] == demo_tok.eos_token_id
    assert first.meta["sources"][0]["docs"] == 60 and first.meta["sources"][0]["tokens"] == first.num_tokens()

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(corpus_mod, "_build", no_tokenizing)
    again = tokenize_corpus([src], "text", demo_tok, tmp_path / "cache", num_proc=1)
    assert not again.built and isinstance(again.tokens, np.memmap)
    assert np.array_equal(again.tokens, first.tokens) and np.array_equal(again.doc_offsets, first.doc_offsets)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.meta["key"]]
    assert sorted(p.name for p in first.path.iterdir()) == ["doc_offsets.i64", "meta.json", "tokens.u16"]


def test_key_follows_file_bytes_text_field_and_tokenizer(tmp_path, demo_tok):
    data = write_jsonl(tmp_path / "a.jsonl", [5, 9])
    key = corpus_key(demo_tok, describe_sources([data], "text"))
    assert corpus_key(demo_tok, describe_sources([data], "text")) == key
    assert corpus_key(demo_tok, describe_sources([data], "body")) != key
    assert corpus_key(WordTokenizer(), describe_sources([data], "text")) != key
    other = demo_tok.__class__.from_pretrained(DEMO_MODEL)
    other.add_tokens(["zebra-token"])
    assert corpus_key(other, describe_sources([data], "text")) != key
    data.write_text(data.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert corpus_key(demo_tok, describe_sources([data], "text")) != key


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [3, 4])
    c = tokenize_corpus([data], "text", WordTokenizer(), tmp_path / "cache", num_proc=1)
    assert c.tokens.dtype == np.uint32 and c.meta["tokens_file"] == "tokens.u32"
    assert c.doc(0)[-1] == 1 and int(c.doc(0)[1]) >= 69_000


def test_partial_and_broken_folders_are_never_read_as_complete(tmp_path, demo_tok, monkeypatch):
    data = write_jsonl(tmp_path / "a.jsonl", [20, 30, 40])
    cache = tmp_path / "cache"
    key = corpus_key(demo_tok, describe_sources([data], "text"))

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(corpus_mod, "_append", crash)
    with pytest.raises(OSError, match="disk full"):
        tokenize_corpus([data], "text", demo_tok, cache, num_proc=1)
    assert not (cache / key).exists() and not list(cache.glob("*.partial"))
    monkeypatch.undo()

    good = tokenize_corpus([data], "text", demo_tok, cache, num_proc=1)
    # a leftover .partial with a valid-looking meta is never opened: only <key> is
    stale = cache / f"{key}.999.partial"
    stale.mkdir()
    (stale / "meta.json").write_text(json.dumps(good.meta))
    # a folder whose token file is short (a copy cut off) is not complete, and is rebuilt
    with open(good.path / good.meta["tokens_file"], "r+b") as fh:
        fh.truncate(4)
    with pytest.raises(DataError, match="not a complete"):
        open_corpus(good.path, key)
    rebuilt = tokenize_corpus([data], "text", demo_tok, cache, num_proc=1)
    assert rebuilt.built and np.array_equal(rebuilt.doc_offsets, good.doc_offsets)


def test_several_processes_in_a_pool_give_the_same_arrays(tmp_path, demo_tok):
    data = write_jsonl(tmp_path / "a.jsonl", [random.Random(i).randint(1, 30) for i in range(4500)])
    one = tokenize_corpus([data], "text", demo_tok, tmp_path / "c1", num_proc=1)
    two = tokenize_corpus([data], "text", demo_tok, tmp_path / "c2", num_proc=2)
    assert two.meta["num_proc"] == 2
    assert np.array_equal(one.tokens, two.tokens) and np.array_equal(one.doc_offsets, two.doc_offsets)


def test_bad_inputs_name_the_file_and_field(tmp_path, demo_tok):
    data = write_jsonl(tmp_path / "a.jsonl", [3])
    with pytest.raises(DataError, match=r"a\.jsonl has no 'body' field"):
        tokenize_corpus([data], "body", demo_tok, tmp_path / "cache", num_proc=1)
    numbers = tmp_path / "n.jsonl"
    numbers.write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(DataError, match=r"n\.jsonl: field 'text' is not text"):
        tokenize_corpus([numbers], "text", demo_tok, tmp_path / "cache", num_proc=1)
    xml = tmp_path / "x.xml"
    xml.write_text("<x/>")
    with pytest.raises(DataError, match="unsupported extension"):
        tokenize_corpus([xml], "text", demo_tok, tmp_path / "cache")
    with pytest.raises(DataError, match="does not exist"):
        tokenize_corpus([tmp_path / "missing.jsonl"], "text", demo_tok, tmp_path / "cache")
    empty = tmp_path / "e.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="No text found"):
        tokenize_corpus([empty], "text", demo_tok, tmp_path / "cache", num_proc=1)


def test_a_file_changed_after_hashing_is_refused(tmp_path, demo_tok, monkeypatch):
    data = write_jsonl(tmp_path / "a.jsonl", [5, 6])
    real = corpus_mod._hash_file

    def swap_then_read(path, copy_to=None):
        if copy_to is not None:
            Path(path).write_text('{"text": "swapped"}\n')
        return real(path, copy_to)

    monkeypatch.setattr(corpus_mod, "_hash_file", swap_then_read)
    with pytest.raises(DataError, match="changed while it was being read"):
        tokenize_corpus([data], "text", demo_tok, tmp_path / "cache", num_proc=1)


def test_verify_sees_every_file_before_tokenizing(tmp_path, demo_tok):
    data = write_jsonl(tmp_path / "a.jsonl", [5, 6])
    seen = []

    def refuse(path, size, digest):
        seen.append((path, size, digest))
        raise DataError("not approved")

    with pytest.raises(DataError, match="not approved"):
        tokenize_corpus([data], "text", demo_tok, tmp_path / "cache", num_proc=1, verify=refuse)
    assert seen[0][1] == data.stat().st_size and not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, demo_tok):
    """Two sources: 'web' mostly short documents, 'books' a few long ones."""
    root = tmp_path_factory.mktemp("mixed")
    web = write_jsonl(root / "web.jsonl", [random.Random(i).randint(5, 60) for i in range(300)] + [400] * 6, seed=1)
    books = write_jsonl(root / "books.jsonl", [random.Random(i).randint(20, 80) for i in range(40)] + [900] * 8,
                        seed=2)
    return tokenize_corpus([web, books], "text", demo_tok, root / "cache", num_proc=1)


def _doc_of(c, token_index: int) -> int:
    return int(np.searchsorted(c.doc_offsets, token_index, side="right")) - 1


def test_windows_never_cross_a_document_boundary(mixed_corpus):
    c, rng = mixed_corpus, random.Random(3)
    windows = c.windows(256, rng)
    inside = packed = 0
    for _ in range(300):
        w = next(windows)
        assert len(w.tokens) == len(w.segment_ids) == 256
        assert list(np.unique(w.segment_ids)) == list(range(len(w.docs)))
        assert np.all(np.diff(w.segment_ids) >= 0)
        for doc, piece in zip(w.docs, w.pieces()):
            d = c.doc(doc)
            if len(piece) == len(d):
                assert np.array_equal(piece, d)
            else:  # a chunk: a contiguous slice of that one document
                starts = [i for i in range(len(d) - len(piece) + 1) if d[i] == piece[0]]
                assert any(np.array_equal(d[i : i + len(piece)], piece) for i in starts)
        inside += len(w.docs) == 1
        packed += len(w.docs) > 1
    assert inside and packed


def test_zero_weight_documents_are_never_drawn_and_slices_skip_them(mixed_corpus):
    c = mixed_corpus
    weights = np.ones(c.num_docs())
    held = set(range(0, c.num_docs(), 3))
    weights[sorted(held)] = 0
    sampler = CorpusSampler(c, weights)
    rng = random.Random(0)
    for _ in range(200):
        assert not held & set(sampler.window(128, rng).docs)
    kept = np.concatenate([c.doc(i) for i in range(c.num_docs()) if i not in held])
    assert len(sampler) == len(kept)
    assert sampler[5:700] == kept[5:700].tolist()
    assert sampler[len(kept) - 10 :] == kept[-10:].tolist()


def test_upsampling_keeps_source_shares_and_raises_the_long_share(mixed_corpus):
    c = mixed_corpus
    weights, mix = long_document_upsampling(c, 300, 3.0)
    assert set(mix) == set(c.source_names)
    for m in mix.values():
        assert m["token_share_after"] == pytest.approx(m["token_share_before"], abs=1e-9)
        assert m["long_doc_share_after"] > m["long_doc_share_before"] > 0
    long = c.doc_lengths() >= 300
    for s in range(2):  # within a source: long documents weigh `factor` times the others
        mine = c.sources == s
        assert np.unique(weights[mine & long]) / np.unique(weights[mine & ~long]) == pytest.approx([3.0])
    # the same in the windows drawn: per-source token shares within 5 points, more long-document tokens
    before, after = _drawn_shares(c, None), _drawn_shares(c, weights)
    for s in range(2):
        assert after["source"][s] == pytest.approx(mix[c.source_names[s]]["token_share_before"], abs=0.05)
        assert after["long"][s] > before["long"][s] + 0.1


def _drawn_shares(c, weights, n: int = 800, length: int = 256) -> dict[str, list[float]]:
    rng, sampler = random.Random(11), CorpusSampler(c, weights)
    tokens, long_tokens = np.zeros(2), np.zeros(2)
    for _ in range(n):
        w = sampler.window(length, rng)
        for doc, piece in zip(w.docs, w.pieces()):
            s = int(c.sources[doc])
            tokens[s] += len(piece)
            long_tokens[s] += len(piece) * (c.doc_lengths()[doc] >= 300)
    return {"source": list(tokens / tokens.sum()), "long": list(long_tokens / tokens)}


def test_stage_rows_from_the_corpus(mixed_corpus):
    sampler = CorpusSampler(mixed_corpus)
    padded = build_stage_rows(sampler, 128, 12, passkey_share=0.0, passkey_builder=None, pad_id=0, seed=5)
    assert all(len(r) == 128 and r == lab for r, lab in zip(padded.input_ids, padded.labels))
    again = build_stage_rows(sampler, 128, 12, passkey_share=0.0, passkey_builder=None, pad_id=0, seed=5)
    assert again.input_ids == padded.input_ids
    packed = build_stage_rows(sampler, 128, 12, passkey_share=0.0, passkey_builder=None, pad_id=0, seed=5, pack=True)
    restarts = [sum(1 for p in pos if p == 0) for pos in packed.position_ids]
    assert max(restarts) > 1  # rows of several documents: position ids restart at each
    for ids, pos, labels in zip(packed.input_ids, packed.position_ids, packed.labels):
        for t, p in enumerate(pos):
            if p == 0 and t > 0:
                assert labels[t] == -100  # no target across a document boundary


_CHILD = textwrap.dedent("""
    import json, sys
    from transformers import AutoTokenizer
    from scaler_wizard.corpus import tokenize_corpus
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    c = tokenize_corpus([sys.argv[2]], "text", tok, sys.argv[3], num_proc=1, wait_timeout_s=120)
    print(json.dumps({"built": c.built, "tokens": c.num_tokens()}))
""")


def test_two_processes_tokenize_once(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [random.Random(i).randint(5, 200) for i in range(2000)])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _CHILD, str(DEMO_MODEL), str(data), str(tmp_path / "cache")]
    waiter = subprocess.Popen(args, env={**env, "RANK": "1"}, stdout=subprocess.PIPE, text=True)
    builder = subprocess.Popen(args, env={**env, "RANK": "0"}, stdout=subprocess.PIPE, text=True)
    results = [json.loads(p.communicate(timeout=240)[0].strip().splitlines()[-1]) for p in (builder, waiter)]
    assert [r["built"] for r in results] == [True, False]
    assert results[0]["tokens"] == results[1]["tokens"] > 0
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 1


def test_a_waiting_rank_fails_fast_on_rank_0_failure_and_times_out(tmp_path, demo_tok, monkeypatch):
    data = write_jsonl(tmp_path / "a.jsonl", [5])
    cache = tmp_path / "cache"
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DataError, match=r"waited 0 s for rank 0"):
        tokenize_corpus([data], "text", demo_tok, cache, wait_timeout_s=0.2)
    cache.mkdir()
    key = corpus_key(demo_tok, describe_sources([data], "text"))
    (cache / f"{key}.failed").write_text("DataError: the disk is full")
    with pytest.raises(DataError, match="Rank 0 failed.*disk is full"):
        tokenize_corpus([data], "text", demo_tok, cache, wait_timeout_s=30)


def test_a_run_with_the_corpus_cache_and_upsampling(tmp_path, tiny_model_dir):
    from scaler_wizard.pipeline import run

    def recipe(name: str) -> Path:
        return write_recipe(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / "runs", run__run_id=name,
                            context__schedule=[128], context__target_length=128, training__steps_per_stage=2,
                            output__merge=False,
                            data__cache_dir=str(tmp_path / "tokens"),
                            data__long_document_upsampling={"enabled": True, "min_length": 600})

    events = []
    for name in ("first", "second"):
        result = run(recipe(name), self_approve=True)
        events.append([json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()])
    corpus_events = [next(e for e in ev if e["metric"] == "data/corpus_tokens") for ev in events]
    assert [e["tags"]["cache"] for e in corpus_events] == ["built", "read"]
    assert corpus_events[0]["tags"]["docs"] == 60
    long_share = [e for e in events[0] if e["metric"] == "data/long_doc_share"]
    assert long_share and long_share[0]["value"] > long_share[0]["tags"]["before"] > 0
    assert long_share[0]["tags"]["docs"] == 48  # the 12 held-out documents (eval_fraction 0.2) are left out
    assert len(list((tmp_path / "tokens").iterdir())) == 1
    # no cache_dir, no upsampling, a small file: the in-memory token stream, as before
    plain = write_recipe(tmp_path / "plain.yaml", tiny_model_dir, tmp_path / "runs", run__run_id="plain",
                         context__schedule=[128], context__target_length=128, training__steps_per_stage=2,
                         output__merge=False)
    result = run(plain, self_approve=True)
    metrics = {json.loads(x)["metric"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()}
    assert "data/corpus_tokens" not in metrics and not (tmp_path / "runs" / ".cache").exists()
