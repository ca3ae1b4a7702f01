"""Checkpoint Cache: commit / verify / restore / gc / pinning / dedup, and its failure modes
(flipped bytes, disk full during commit, interrupted commits)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scaler_wizard.cache import checkpoints
from scaler_wizard.cache.cache_cli import cache_app, parse_rollback_target, rollback_command
from scaler_wizard.cache.checkpoints import (
    MARKER_NAME,
    CheckpointCache,
    SnapshotCommitError,
    SnapshotCorruptError,
    SnapshotNotFoundError,
)
from scaler_wizard.errors import InputError


def _files(step: int) -> dict[str, bytes]:
    return {
        "config/adapter_config.json": b'{"r": 8, "alpha": 16}\n',  # identical in every snapshot
        "model/trainable.safetensors": f"weights at step {step}".encode() * 50,
        "data/position.json": json.dumps({"batch": step}).encode(),
    }


def _commit(cache: CheckpointCache, step: int, run: str = "run1", **kw):
    return cache.commit(
        run, _files(step), step=step, stage=kw.pop("stage", 1), metrics={"train/loss": 1.0 / (step + 1)}, **kw
    )


def _snapshot_files(cache: CheckpointCache, snap) -> list[Path]:
    return [snap.path / "manifest.json", snap.path / MARKER_NAME] + [
        cache.blob_path(e.sha256) for e in snap.files.values()
    ]


def _flip(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_commit_verify_restore_roundtrip(tmp_path):
    cache = CheckpointCache(tmp_path / "cache")
    snap = _commit(cache, 5, phase="train")
    assert cache.verify(snap).ok
    assert [s.ref for s in cache.list()] == [snap.ref]
    assert snap.step == 5 and snap.stage == 1 and snap.metrics == {"train/loss": pytest.approx(1 / 6)}

    out = cache.restore(snap, tmp_path / "restored", mode="link")
    for name, body in _files(5).items():
        assert (out / name).read_bytes() == body
        assert os.path.samefile(
            out / name, cache.blob_path(snap.files[name].sha256)
        )  # hardlinked, not copied
    copied = cache.restore(snap, tmp_path / "copied", mode="copy")
    assert not os.path.samefile(copied / "data/position.json", out / "data/position.json")
    assert json.loads((out / "SNAPSHOT.json").read_text())["step"] == 5
    with pytest.raises(InputError, match="not empty"):
        cache.restore(snap, tmp_path / "restored")


def test_non_finite_metric_is_kept_and_bad_names_rejected(tmp_path):
    cache = CheckpointCache(tmp_path)
    snap = cache.commit("r", {"a.bin": b"x"}, step=0, metrics={"train/loss": float("nan")})
    assert snap.metrics == {"train/loss": {"non_finite": "nan"}}
    for bad in ("../escape", "/abs", "a/../b", "manifest.json"):
        with pytest.raises(InputError):
            cache.commit("r", {bad: b"x"}, step=1)
    with pytest.raises(InputError):
        cache.commit("../r", {"a": b"x"}, step=1)


def test_identical_files_are_stored_once(tmp_path):
    cache = CheckpointCache(tmp_path)
    a, b = _commit(cache, 5), _commit(cache, 10)
    assert a.files["config/adapter_config.json"] == b.files["config/adapter_config.json"]
    blobs = list((tmp_path / "blobs").glob("*/*"))
    assert len(blobs) == 5  # 3 + 3 files, one shared
    stats = cache.dedup_stats("run1")
    assert stats["saved_bytes"] == len(_files(5)["config/adapter_config.json"])
    # The same state twice (e.g. a stage-boundary snapshot right after a step snapshot) costs no blob bytes.
    c = cache.commit("run1", _files(10), step=10, phase="stage_end")
    assert len(list((tmp_path / "blobs").glob("*/*"))) == 5 and cache.verify(c).ok


def test_flipped_byte_in_any_snapshot_file_is_detected(tmp_path):
    """Every byte of every file (manifest, marker, each blob) flipped in turn: verify fails 100%."""
    cache = CheckpointCache(tmp_path)
    cache.commit("r", {"w.bin": bytes(range(40)), "s.json": b'{"a":1}'}, step=1, metrics={"loss": 2.0})
    snap = cache.list("r")[0]
    checked = 0
    for path in _snapshot_files(cache, snap):
        original = path.read_bytes()
        for offset in range(len(original)):
            _flip(path, offset)
            assert not cache.verify(snap).ok, f"flip at {path.name}:{offset} not detected"
            path.write_bytes(original)
            checked += 1
        assert cache.verify(snap).ok
    assert checked > 300


def test_missing_blob_or_marker_is_detected(tmp_path):
    cache = CheckpointCache(tmp_path)
    snap = _commit(cache, 1)
    blob = cache.blob_path(snap.files["data/position.json"].sha256)
    blob.unlink()
    report = cache.verify(snap)
    assert not report.ok and "missing" in report.problems[0]
    with pytest.raises(SnapshotCorruptError):
        cache.restore(snap, tmp_path / "out")
    (snap.path / MARKER_NAME).unlink()
    assert "never completed" in cache.verify(snap).problems[0]


def test_enospc_during_commit_fails_cleanly(tmp_path, monkeypatch):
    cache = CheckpointCache(tmp_path)
    good = _commit(cache, 5)
    real_write = checkpoints.write_all
    calls = {"n": 0}

    def full_disk(fh, data):
        calls["n"] += 1
        if calls["n"] >= 2:  # first new blob written, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fh, data)

    monkeypatch.setattr(checkpoints, "write_all", full_disk)
    with pytest.raises(SnapshotCommitError, match="disk is full"):
        _commit(cache, 10)
    monkeypatch.setattr(checkpoints, "write_all", real_write)

    assert [s.ref for s in cache.list()] == [good.ref]
    assert cache.verify(good).ok and cache.latest_valid("run1").ref == good.ref
    assert not any((tmp_path / "tmp").iterdir())  # no staging leftovers
    # An orphan blob from the failed commit is removed by gc; the good snapshot still verifies.
    cache.gc()
    assert cache.verify(good).ok and len(list((tmp_path / "blobs").glob("*/*"))) == 3


def test_enospc_on_manifest_or_marker_fails_cleanly(tmp_path, monkeypatch):
    cache = CheckpointCache(tmp_path)
    good = _commit(cache, 5)
    real_write = checkpoints.write_all

    def full_on_small_writes(fh, data):
        if Path(fh.name).name in ("manifest.json", MARKER_NAME):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fh, data)

    monkeypatch.setattr(checkpoints, "write_all", full_on_small_writes)
    with pytest.raises(SnapshotCommitError):
        _commit(cache, 10)
    assert [s.ref for s in cache.list()] == [good.ref] and cache.verify(good).ok


def test_interrupted_commit_is_never_chosen(tmp_path):
    cache = CheckpointCache(tmp_path)
    good = _commit(cache, 5)
    newer = _commit(cache, 10)
    # A commit killed before its marker: a staging folder, and a snapshot folder without marker.
    (tmp_path / "tmp" / "run1.s00000015-ff.999999.abcd").mkdir()
    half = cache.run_dir("run1") / "s00000020-ffffffffffffffff"
    half.mkdir()
    (half / "manifest.json").write_text(json.dumps({"files": {}, "step": 20}))
    assert cache.latest_valid("run1").ref == newer.ref
    assert [p.name for p in cache.incomplete("run1")] == [half.name]
    # A newer snapshot whose blob was damaged is skipped in favour of the one before it.
    _flip(cache.blob_path(newer.files["model/trainable.safetensors"].sha256), 3)
    assert cache.latest_valid("run1").ref == good.ref
    report = cache.gc()
    assert report.removed_incomplete == [f"run1/{half.name}"] and report.removed_staging
    assert cache.latest_valid("run1").ref == good.ref


def test_latest_valid_none_and_find(tmp_path):
    cache = CheckpointCache(tmp_path)
    assert cache.latest_valid("nothing") is None
    _commit(cache, 5, stage=1)
    s2 = _commit(cache, 10, stage=2)
    assert cache.find("run1", step=10).ref == s2.ref
    assert cache.find("run1", stage=1).step == 5
    with pytest.raises(SnapshotNotFoundError, match="steps available: \\[5, 10\\]"):
        cache.find("run1", step=7)


def test_gc_evicts_lru_but_never_pinned_nor_newest(tmp_path):
    cache = CheckpointCache(tmp_path)
    boundary = _commit(cache, 5, pinned=True, phase="stage_end")
    a = _commit(cache, 10)
    b = _commit(cache, 12)
    last_good = _commit(cache, 15)
    newest = _commit(cache, 20)
    cache.pin(last_good, "last_good")
    cache.open_files(a)  # used recently: b is now the least recently used
    report = cache.gc(budget_bytes=0)
    assert report.evicted == [b.ref, a.ref] and report.over_budget
    assert {s.ref for s in cache.list()} == {boundary.ref, last_good.ref, newest.ref}
    assert all(cache.verify(s).ok for s in cache.list())

    # Moving the pin releases the old one.
    again = _commit(cache, 25)
    cache.pin(again, "last_good")
    cache.unpin(last_good, "last_good")
    assert "last_good" not in cache.get("run1", last_good.snapshot_id).pins
    report = cache.gc(budget_bytes=0)
    assert report.evicted == [last_good.ref, newest.ref]
    assert {s.ref for s in cache.list()} == {boundary.ref, again.ref}


def test_budget_enforced_after_each_commit(tmp_path):
    probe = CheckpointCache(tmp_path / "probe")
    one = probe.stored_bytes() if _commit(probe, 1) else 0
    cache = CheckpointCache(tmp_path / "c", budget_bytes=int(one * 2.5))
    for step in range(1, 6):
        _commit(cache, step)
    assert cache.stored_bytes() <= int(one * 2.5)
    assert cache.latest_valid("run1").step == 5  # the newest is the most recently used


def test_cli_list_verify_gc_and_rollback(tmp_path):
    root = tmp_path / "cache"
    cache = CheckpointCache(root)
    _commit(cache, 5, stage=1)
    s10 = _commit(cache, 10, stage=2)
    runner = CliRunner()
    res = runner.invoke(cache_app, ["list", "--root", str(root)])
    assert res.exit_code == 0 and "s00000010" in res.output and "saved by dedup" in res.output
    assert runner.invoke(cache_app, ["verify", "--root", str(root)]).exit_code == 0
    _flip(cache.blob_path(s10.files["data/position.json"].sha256), 0)
    res = runner.invoke(cache_app, ["verify", "--root", str(root)])
    assert res.exit_code == 1 and "BAD" in res.output
    assert runner.invoke(cache_app, ["gc", "--root", str(root), "--budget-gb", "1"]).exit_code == 0

    assert parse_rollback_target("40") == {"step": 40} and parse_rollback_target("stage:2") == {"stage": 2}
    with pytest.raises(InputError):
        parse_rollback_target("latest")
    rollback_command(run="run1", to="5", target=tmp_path / "rb", copy=False, root=root)
    assert (tmp_path / "rb" / "data/position.json").read_bytes() == _files(5)["data/position.json"]
    with pytest.raises(SnapshotNotFoundError, match="failed verification"):
        rollback_command(run="run1", to="stage:2", target=tmp_path / "rb2", copy=False, root=root)
