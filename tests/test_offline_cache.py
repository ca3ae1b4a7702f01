"""Offline teacher cache: round trip against the teacher's own log-probabilities, tamper
detection of the data and of the shards, the offline teacher in the loss, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from scaler_wizard.data import StageRows
from scaler_wizard.distill.distill_cli import distill_app
from scaler_wizard.distill.losses import DistillConfig, TeacherBatch, TeacherHidden, distillation_loss
from scaler_wizard.distill.offline_cache import (
    MANIFEST_NAME,
    OfflineCache,
    build_cache,
    rows_sha256,
    stream_windows,
)
from scaler_wizard.distill.replay import mix_replay
from scaler_wizard.distill.teacher import CACHE_ROW_KEY, OfflineTeacher
from scaler_wizard.errors import DataError

V, L = 64, 12


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=L,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.2,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def make_rows(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, (n, L), generator=g).tolist()


@pytest.fixture
def cache_dir(tmp_path, teacher):
    out = tmp_path / "cache"
    build_cache(teacher, make_rows(), out, k=5, teacher_id="tiny", temperature=2.0, rows_per_shard=3,
                batch_size=2, chunk_size=5)
    return out


def test_round_trip(cache_dir, teacher):
    rows = make_rows()
    cache = OfflineCache.open(cache_dir)
    manifest = json.loads((cache_dir / MANIFEST_NAME).read_text())
    assert (manifest["k"], manifest["length"], manifest["n_rows"], manifest["temperature"]) == (5, L, 7, 2.0)
    assert manifest["teacher"]["id"] == "tiny" and manifest["teacher"]["vocab_size"] == V
    assert [s["rows"] for s in manifest["shards"]] == [[0, 3], [3, 6], [6, 7]]
    assert manifest["rows_sha256"] == rows_sha256(rows)
    assert not (cache_dir.parent / "cache.partial").exists()
    cache.verify_rows(rows)
    assert cache.token_rows() == rows
    found = cache.lookup([5, 0, 6])
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([rows[5], rows[0], rows[6]])).logits
    ref_vals, ref_ids = F.log_softmax(logits / 2.0, -1).topk(5, -1)
    assert found.input_ids.tolist() == [rows[5], rows[0], rows[6]]
    torch.testing.assert_close(found.topk_logprobs, ref_vals, atol=1e-5, rtol=1e-5)
    assert torch.equal(found.topk_ids, ref_ids)


def test_data_tamper_detected(cache_dir):
    cache = OfflineCache.open(cache_dir)
    rows = make_rows()
    changed = [list(r) for r in rows]
    changed[4][7] = (changed[4][7] + 1) % V
    for bad in (changed, rows[::-1], rows[:-1], [r + [3] for r in rows]):
        with pytest.raises(DataError, match="made from other data"):
            cache.verify_rows(bad)
    # ids split into rows differently hash differently
    flat = [t for r in rows for t in r]
    assert rows_sha256([flat]) != rows_sha256(rows)


def test_shard_tamper_detected(cache_dir):
    shard = cache_dir / "shard-00001.safetensors"
    tensors = load_file(str(shard))
    tensors["topk_logprobs"][0, 0, 0] += 0.5
    save_file(tensors, str(shard), metadata={"format": "scaler-wizard/distill-topk-cache"})
    with pytest.raises(DataError, match="shard-00001.safetensors was modified"):
        OfflineCache.open(cache_dir)


def test_byte_flip_and_missing_shard_and_manifest_edits(cache_dir, tmp_path):
    shard = cache_dir / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="modified"):
        OfflineCache.open(cache_dir)
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        OfflineCache.open(cache_dir)
    manifest_path = cache_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["k"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="k \\(missing\\)"):
        OfflineCache.open(cache_dir)
    with pytest.raises(DataError, match="not an offline teacher cache"):
        OfflineCache.open(tmp_path)


def test_manifest_shape_edit_detected(cache_dir):
    manifest_path = cache_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["k"] = 6
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="the manifest implies"):
        OfflineCache.open(cache_dir)


def test_build_refuses_existing_folder_and_bad_inputs(cache_dir, teacher):
    with pytest.raises(DataError, match="exists and is not empty"):
        build_cache(teacher, make_rows(), cache_dir, k=5, teacher_id="x")
    with pytest.raises(DataError, match="vocabulary size 64"):
        build_cache(teacher, make_rows(), cache_dir.parent / "c2", k=65, teacher_id="x")
    with pytest.raises(DataError, match="row 1 has 3 tokens"):
        build_cache(teacher, [[2] * 4, [2] * 3], cache_dir.parent / "c3", k=5, teacher_id="x")
    with pytest.raises(DataError, match="outside the teacher's vocabulary"):
        build_cache(teacher, [[2, 99]], cache_dir.parent / "c4", k=5, teacher_id="x")
    build_cache(teacher, make_rows(2, seed=3), cache_dir, k=5, teacher_id="x", overwrite=True)
    assert OfflineCache.open(cache_dir).n_rows == 2


def test_offline_teacher_in_the_loss_matches_a_full_teacher_when_k_is_the_vocabulary(tmp_path, teacher):
    rows = make_rows()
    out = tmp_path / "full"
    build_cache(teacher, rows, out, k=V, teacher_id="tiny", temperature=1.0, rows_per_shard=4)
    cache = OfflineCache.open(out)
    stage_len = 2 * L
    stage = StageRows([[3] * stage_len] * 4, [[3] * stage_len] * 4, [[1] * stage_len] * 4, [0] * 4)
    mixed = mix_replay(stage, cache.token_rows(), 0.5, pad_id=1, seed=0)
    batch = {key: torch.stack([mixed[i][key] for i in range(4)]) for key in mixed[0]}
    offline = OfflineTeacher(cache, teacher)(teacher, batch)
    replay = batch[CACHE_ROW_KEY] >= 0
    assert offline.mask.shape == (4, L)
    assert offline.mask[replay, : L - 1].all() and not offline.mask[replay, L - 1].any()
    assert not offline.mask[~replay].any()

    with torch.no_grad():
        hidden = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    head = teacher.lm_head.weight
    full = TeacherBatch(TeacherHidden(hidden[:, :L], head), offline.mask)
    student_hidden = torch.randn(4, stage_len - 1, 32)
    labels = batch["labels"][:, 1:]
    cfg = DistillConfig(temperature=1.5, kd_weight=0.5, chunk_size=7)
    a = distillation_loss(student_hidden, head, labels, offline, cfg)
    b = distillation_loss(student_hidden, head, labels, full, cfg)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    assert a.kd_tokens == 2 * (L - 1)

    # rows that are not the cache's rows are refused; batches without cached rows get no teacher
    tampered = dict(batch, input_ids=batch["input_ids"].clone())
    tampered["input_ids"][replay.nonzero()[0, 0], 2] += 1
    with pytest.raises(DataError, match="do not match the tokens cached"):
        OfflineTeacher(cache)(teacher, tampered)
    assert OfflineTeacher(cache)(teacher, dict(batch, **{CACHE_ROW_KEY: torch.full((4,), -1)})) is None
    with pytest.raises(DataError, match="replay_index"):
        OfflineTeacher(cache)(teacher, {"input_ids": batch["input_ids"]})


def test_stream_windows():
    assert stream_windows(list(range(10)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert stream_windows(list(range(10)), 3, max_rows=1) == [[0, 1, 2]]
    with pytest.raises(DataError, match="fewer than one 11-token row"):
        stream_windows(list(range(10)), 11)


def test_cli_cache(tmp_path, teacher):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "model"
    teacher.save_pretrained(folder)
    names = ["<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(3, V)]
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(f"w{3 + (i * 7 + j) % (V - 3)}" for j in range(20))})
                              for i in range(5)))
    out = tmp_path / "cache"
    result = CliRunner().invoke(distill_app, ["cache", str(folder), str(data), "--output", str(out),
                                              "--length", "8", "--k", "4", "--shard-rows", "4"])
    assert result.exit_code == 0, result.output
    cache = OfflineCache.open(out)
    assert (cache.n_rows, cache.length, cache.k) == (13, 8, 4)  # 5 docs x (20 words + eos) = 105 tokens
    assert cache.token_rows()[0] == [3, 4, 5, 6, 7, 8, 9, 10]  # "w3 w4 ...": WordLevel ids = word numbers
    assert cache.token_rows()[2][4] == 1  # the end-of-document token after the first 20 words
    missing = CliRunner().invoke(distill_app, ["cache", str(folder), str(tmp_path / "nope.jsonl"), "-o",
                                               str(tmp_path / "c2")])
    assert isinstance(missing.exception, DataError)
