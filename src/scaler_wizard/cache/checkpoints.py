"""Checkpoint Cache (spec module 9): content-addressed, atomically committed snapshots.

Layout under the cache root::

    blobs/<aa>/<sha256>                 every distinct file body, stored once, read-only
    snapshots/<run_id>/<snapshot_id>/
        manifest.json                   logical name -> {sha256, size} + run/stage/step/phase/metrics
        COMPLETE                        completion marker, written last; holds the manifest's sha256
        PIN-<reason>                    optional empty files: retention pins added after commit
    tmp/                                staging area of commits in progress (same filesystem)
    lock                                flock taken by commit and gc so gc never races a commit

Why this shape:

* **Atomic commit.** A snapshot becomes visible only by ``rename`` of a fully written, fsynced
  directory whose completion marker was written last; the parent is fsynced after the rename.
  This is the commit protocol of OLMo-core and ``torch.distributed.checkpoint`` (HF Trainer's
  checkpoints are not atomic: transformers issues 35782, 35525). A crash at any moment leaves
  either the old set of snapshots or the old set plus one complete new snapshot; staging
  leftovers are never listed and are removed by :meth:`CheckpointCache.gc`.
* **Content addressing.** A blob is named by the sha256 of its bytes, so a file that is identical
  across snapshots (configs, unchanged tensors, a stage-boundary snapshot taken right after a
  step snapshot) is stored once, and verification is a re-hash.
* **Every byte checked.** ``verify`` re-hashes every blob against the manifest and checks the
  marker byte for byte against the manifest's hash, so a flipped byte in any snapshot file —
  blob, manifest or marker — is reported.
* **Retention.** A size budget is enforced by evicting the least recently used snapshots; pinned
  snapshots (stage boundaries pinned at commit, "last good" pinned later) and the newest snapshot
  of each run (its resume point) are never evicted.
  "Used" is the marker's mtime, touched on commit and on every restore/open.

This module is pure Python (no torch): it stores files. ``state.py`` turns live training state into
those files and back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import InputError, ScalerWizardError
from ..fsutil import check_name, is_safe_name, sha256_file, utc_now
from ..fsutil import fsync_dir as _fsync_dir

try:  # POSIX advisory locks; on platforms without fcntl, commit and gc must not run concurrently.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MARKER_NAME = "COMPLETE"
PIN_PREFIX = "PIN-"
CACHE_DIRNAME = ".checkpoints"
RESTORE_INFO_NAME = "SNAPSHOT.json"
RESERVED_NAMES = (MANIFEST_NAME, MARKER_NAME, RESTORE_INFO_NAME)
CHUNK = 8 * 1024 * 1024
#: Fault-injection hook (bench/faults.py): seconds to sleep at each commit phase, widening the
#: window in which a SIGKILL lands inside a commit. Unset in normal use.
COMMIT_SLEEP_ENV = "SCALER_WIZARD_FAULT_COMMIT_SLEEP"

PHASE_TRAIN = "train"
PHASE_STAGE_END = "stage_end"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------- errors


class CheckpointError(ScalerWizardError):
    """A snapshot could not be written, read or verified."""


class SnapshotCommitError(CheckpointError):
    """The commit failed (disk full, I/O error); nothing partial is visible, older snapshots are intact."""


class SnapshotCorruptError(CheckpointError):
    """A snapshot exists but fails verification; ``problems`` lists each bad file."""

    def __init__(self, snapshot: str, problems: list[str]):
        self.snapshot = snapshot
        self.problems = problems
        super().__init__(
            f"Snapshot {snapshot} is corrupt: {'; '.join(problems)}.",
            hint="Do not resume from it; use `scaler-wizard cache verify` to list good snapshots.",
        )


class SnapshotNotFoundError(InputError):
    """No snapshot matches what was asked for."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class SnapshotInfo:
    """A committed snapshot as described by its manifest (see module docstring for the layout)."""

    run_id: str
    snapshot_id: str
    path: Path
    stage: int | str | None
    step: int
    phase: str
    metrics: dict[str, Any]
    created_at: str
    created_ns: int
    pinned_at_commit: bool
    files: dict[str, FileEntry]
    extra: dict[str, Any]
    schema_version: int
    pins: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.run_id}/{self.snapshot_id}"

    @property
    def pinned(self) -> bool:
        return self.pinned_at_commit or bool(self.pins)

    @property
    def logical_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    @property
    def last_used_ns(self) -> int:
        try:
            return (self.path / MARKER_NAME).stat().st_mtime_ns
        except OSError:
            return 0


@dataclass
class VerifyReport:
    ref: str
    ok: bool
    problems: list[str] = field(default_factory=list)


@dataclass
class GcReport:
    evicted: list[str] = field(default_factory=list)
    removed_incomplete: list[str] = field(default_factory=list)
    removed_staging: list[str] = field(default_factory=list)
    removed_blobs: int = 0
    freed_bytes: int = 0
    stored_bytes: int = 0
    budget_bytes: int | None = None

    @property
    def over_budget(self) -> bool:
        """True when only pinned snapshots are left and they alone exceed the budget."""
        return self.budget_bytes is not None and self.stored_bytes > self.budget_bytes


# ----------------------------------------------------------------------------- helpers


def check_logical_name(name: str) -> str:
    """A snapshot file name is a relative POSIX path that cannot escape the restore folder."""
    p = PurePosixPath(name)
    if (
        not name
        or p.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
        or "\\" in name
        or "\x00" in name
        or name in RESERVED_NAMES
    ):
        raise InputError(
            f"Invalid snapshot file name {name!r}.",
            hint="Use a relative path like 'optimizer/state.json' without '..', '\\' or a leading '/'.",
        )
    return name


def encode_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics go into JSON: non-finite floats are written as {"non_finite": "nan"|"inf"|"-inf"},
    never dropped (same rule as the telemetry sink)."""
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
            out[str(k)] = v
            continue
        f = float(v)
        out[str(k)] = (
            f
            if math.isfinite(f)
            else {"non_finite": "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")}
        )
    return out


def marker_bytes(manifest_sha256: str) -> bytes:
    """The exact marker content: verify compares it byte for byte, so any flip in it is detected."""
    return f"scaler-wizard snapshot complete\nmanifest-sha256 {manifest_sha256}\n".encode("ascii")


def write_all(fh: Any, data: bytes | memoryview) -> None:
    """The single place blob bytes are written (tests patch it to simulate ENOSPC)."""
    fh.write(data)


def _fault_sleep() -> None:
    delay = os.environ.get(COMMIT_SLEEP_ENV)
    if delay:
        time.sleep(float(delay))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- the cache


class CheckpointCache:
    """A content-addressed store of training snapshots under ``root``.

    ``budget_bytes``: when set, every commit runs :meth:`gc` afterwards so the stored bytes stay
    within it (pinned snapshots excepted). Only the main process of a distributed run may write.
    """

    def __init__(self, root: Path | str, *, budget_bytes: int | None = None):
        if budget_bytes is not None and budget_bytes < 0:
            raise InputError(f"Cache budget must be >= 0 bytes, got {budget_bytes}.")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.blobs_dir = self.root / "blobs"
        self.snapshots_dir = self.root / "snapshots"
        self.tmp_dir = self.root / "tmp"

    # ------------------------------------------------------------------ paths and locking

    def blob_path(self, sha256: str) -> Path:
        return self.blobs_dir / sha256[:2] / sha256

    def run_dir(self, run_id: str) -> Path:
        return self.snapshots_dir / check_name("run id", run_id)

    def _ensure_layout(self) -> None:
        for d in (self.blobs_dir, self.snapshots_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "a+") as fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ commit

    def commit(
        self,
        run_id: str,
        files: Mapping[str, bytes | Path | str],
        *,
        step: int,
        stage: int | str | None = None,
        phase: str = PHASE_TRAIN,
        metrics: Mapping[str, Any] | None = None,
        pinned: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> SnapshotInfo:
        """Store ``files`` (logical name -> bytes or a path to read) as one snapshot, atomically.

        Raises :class:`SnapshotCommitError` on any I/O failure (e.g. ENOSPC); then nothing of the
        new snapshot is visible and earlier snapshots are untouched (blobs are never overwritten).
        """
        check_name("run id", run_id)
        if not files:
            raise InputError("A snapshot needs at least one file.", hint="Pass the state files to commit.")
        for name in files:
            check_logical_name(name)
        if int(step) < 0:
            raise InputError(f"Snapshot step must be >= 0, got {step}.")
        created_ns = time.time_ns()
        snapshot_id = f"s{int(step):08d}-{created_ns:x}"
        with self._lock():
            self._ensure_layout()
            staging = self.tmp_dir / f"{run_id}.{snapshot_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                staging.mkdir()
                entries = {name: self._store_blob(src) for name, src in sorted(files.items())}
                manifest = {
                    "schema_version": SCHEMA_VERSION,
                    "kind": "scaler_wizard.snapshot",
                    "run_id": run_id,
                    "snapshot_id": snapshot_id,
                    "stage": stage,
                    "step": int(step),
                    "phase": str(phase),
                    "metrics": encode_metrics(metrics),
                    "created_at": utc_now(),
                    "created_ns": created_ns,
                    "pinned": bool(pinned),
                    "extra": dict(extra or {}),
                    "files": {n: {"sha256": e.sha256, "size": e.size} for n, e in entries.items()},
                }
                body = (json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n").encode(
                    "utf-8"
                )
                self._write_synced(staging / MANIFEST_NAME, body)
                _fault_sleep()
                self._write_synced(staging / MARKER_NAME, marker_bytes(hashlib.sha256(body).hexdigest()))
                _fsync_dir(staging, strict=True)
                _fault_sleep()
                final_parent = self.run_dir(run_id)
                final_parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging, final_parent / snapshot_id)
                _fsync_dir(final_parent, strict=True)
                _fsync_dir(self.snapshots_dir, strict=True)
            except BaseException as exc:
                shutil.rmtree(staging, ignore_errors=True)
                if not isinstance(exc, OSError):
                    raise
                reason = "the disk is full" if exc.errno == errno.ENOSPC else f"{exc.strerror or exc}"
                raise SnapshotCommitError(
                    f"Snapshot of run {run_id} at step {step} was not committed: {reason}.",
                    hint="Earlier snapshots are intact. Free space or lower the cache budget "
                    "(`scaler-wizard cache gc --budget-gb N`), then retry.",
                ) from exc
        info = self.get(run_id, snapshot_id)
        if self.budget_bytes is not None:
            self.gc(budget_bytes=self.budget_bytes)
        return info

    def _store_blob(self, src: bytes | Path | str) -> FileEntry:
        """Hash ``src``; write it into the blob store unless a blob with that hash is there already.

        The body goes to a staging file, is fsynced, then renamed to its hash name, so a blob
        name always denotes complete bytes (a crash leaves at most an unnamed staging file)."""
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            digest, size = hashlib.sha256(data).hexdigest(), len(data)
        else:
            src = Path(src)
            if not src.is_file():
                raise InputError(f"Snapshot source file {src} does not exist.")
            digest, size, data = sha256_file(src), src.stat().st_size, None
        final = self.blob_path(digest)
        if final.is_file() and final.stat().st_size == size and sha256_file(final) == digest:
            return FileEntry(digest, size)  # stored once; a damaged blob is replaced below
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"blob.{digest[:16]}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as out:
                if data is not None:
                    write_all(out, data)
                else:
                    with open(src, "rb") as fh:
                        while chunk := fh.read(CHUNK):
                            write_all(out, chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            _fault_sleep()
            os.rename(tmp, final)
            _fsync_dir(final.parent, strict=True)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return FileEntry(digest, size)

    @staticmethod
    def _write_synced(path: Path, data: bytes) -> None:
        with open(path, "wb") as fh:
            write_all(fh, data)
            fh.flush()
            os.fsync(fh.fileno())

    # ------------------------------------------------------------------ listing

    def runs(self) -> list[str]:
        if not self.snapshots_dir.is_dir():
            return []
        return sorted(p.name for p in self.snapshots_dir.iterdir() if p.is_dir() and is_safe_name(p.name))

    def _snapshot_dirs(self, run_id: str) -> list[Path]:
        d = self.run_dir(run_id)
        return sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def get(self, run_id: str, snapshot_id: str) -> SnapshotInfo:
        """Read one committed snapshot's manifest (raises if incomplete or unreadable)."""
        path = self.run_dir(run_id) / check_name("snapshot id", snapshot_id)
        if not (path / MARKER_NAME).is_file():
            raise SnapshotNotFoundError(
                f"Snapshot {run_id}/{snapshot_id} not found or incomplete (no {MARKER_NAME} marker) in {self.root}.",
                hint="List snapshots with `scaler-wizard cache list`.",
            )
        return self._read_info(path)

    def _read_info(self, path: Path) -> SnapshotInfo:
        try:
            m = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
            files = {
                check_logical_name(n): FileEntry(str(e["sha256"]), int(e["size"]))
                for n, e in m["files"].items()
            }
            pins = tuple(sorted(p.name[len(PIN_PREFIX) :] for p in path.glob(PIN_PREFIX + "*")))
            # Forward-compatible: unknown keys are ignored; only what we use is required.
            return SnapshotInfo(
                run_id=str(m["run_id"]),
                snapshot_id=str(m["snapshot_id"]),
                path=path,
                stage=m.get("stage"),
                step=int(m["step"]),
                phase=str(m.get("phase", PHASE_TRAIN)),
                metrics=dict(m.get("metrics", {})),
                created_at=str(m.get("created_at", "")),
                created_ns=int(m["created_ns"]),
                pinned_at_commit=bool(m.get("pinned", False)),
                files=files,
                extra=dict(m.get("extra", {})),
                schema_version=int(m["schema_version"]),
                pins=pins,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, InputError) as exc:
            raise SnapshotCorruptError(
                f"{path.parent.name}/{path.name}", [f"{MANIFEST_NAME} unreadable ({exc})"]
            ) from exc

    def list(self, run_id: str | None = None) -> list[SnapshotInfo]:
        """Complete snapshots (marker present) with a readable manifest, oldest first.
        Incomplete or unreadable ones are skipped here; ``verify``/``gc`` report them."""
        out = []
        for run in [run_id] if run_id else self.runs():
            for path in self._snapshot_dirs(run):
                if not (path / MARKER_NAME).is_file():
                    continue
                with contextlib.suppress(SnapshotCorruptError):
                    out.append(self._read_info(path))
        return sorted(out, key=lambda s: (s.created_ns, s.snapshot_id))

    def incomplete(self, run_id: str | None = None) -> list[Path]:
        """Snapshot folders without a completion marker (never chosen for resume)."""
        return [
            p
            for run in ([run_id] if run_id else self.runs())
            for p in self._snapshot_dirs(run)
            if not (p / MARKER_NAME).is_file()
        ]

    # ------------------------------------------------------------------ verification

    def verify(self, snap: SnapshotInfo | str) -> VerifyReport:
        """Check every byte: the marker against the manifest's hash, each blob's size and sha256."""
        path, ref = self._resolve_path(snap)
        problems: list[str] = []
        try:
            body = (path / MANIFEST_NAME).read_bytes()
        except OSError as exc:
            return VerifyReport(ref, False, [f"{MANIFEST_NAME} missing ({exc.strerror})"])
        try:
            marker = (path / MARKER_NAME).read_bytes()
        except OSError:
            return VerifyReport(ref, False, [f"{MARKER_NAME} marker missing: the commit never completed"])
        if marker != marker_bytes(hashlib.sha256(body).hexdigest()):
            problems.append(
                f"{MANIFEST_NAME} or {MARKER_NAME} changed (manifest hash does not match the marker)"
            )
            return VerifyReport(ref, False, problems)
        try:
            info = self._read_info(path)
        except SnapshotCorruptError as exc:
            return VerifyReport(ref, False, exc.problems)
        for name, entry in sorted(info.files.items()):
            problems.extend(self._check_blob(name, entry))
        return VerifyReport(ref, not problems, problems)

    def _check_blob(self, name: str, entry: FileEntry) -> list[str]:
        if not _SHA256.match(entry.sha256):
            return [f"{name}: malformed sha256 in manifest"]
        blob = self.blob_path(entry.sha256)
        try:
            size = blob.stat().st_size
        except OSError:
            return [f"{name}: blob {entry.sha256[:12]} missing"]
        if size != entry.size:
            return [f"{name}: size {size} != {entry.size} recorded"]
        if sha256_file(blob) != entry.sha256:
            return [f"{name}: content changed (sha256 mismatch, blob {entry.sha256[:12]})"]
        return []

    def _resolve_path(self, snap: SnapshotInfo | str) -> tuple[Path, str]:
        if isinstance(snap, SnapshotInfo):
            return snap.path, snap.ref
        run_id, _, snapshot_id = snap.partition("/")
        return self.run_dir(run_id) / check_name("snapshot id", snapshot_id), snap

    def latest_valid(self, run_id: str) -> SnapshotInfo | None:
        """The newest snapshot of ``run_id`` that is complete and verifies; incomplete or
        corrupt ones are skipped. ``None`` when there is none."""
        for info in reversed(self.list(run_id)):
            if self.verify(info).ok:
                return info
        return None

    def find(self, run_id: str, *, step: int | None = None, stage: int | str | None = None) -> SnapshotInfo:
        """The newest valid snapshot at ``step`` (or the newest valid one of ``stage``)."""

        def matches(s: SnapshotInfo) -> bool:
            if step is not None and s.step != step:
                return False
            return stage is None or str(s.stage) == str(stage)

        candidates = [s for s in self.list(run_id) if matches(s)]
        for info in reversed(candidates):
            if self.verify(info).ok:
                return info
        what = f"step {step}" if step is not None else f"stage {stage}"
        have = sorted({s.step for s in self.list(run_id)})
        raise SnapshotNotFoundError(
            f"No valid snapshot of run {run_id} at {what} in {self.root}"
            + (
                " (candidates failed verification)."
                if candidates
                else f"; steps available: {have or 'none'}."
            ),
            hint="List snapshots with `scaler-wizard cache list --run RUN`.",
        )

    # ------------------------------------------------------------------ reading back

    def open_files(self, snap: SnapshotInfo, *, verify: bool = True) -> dict[str, Path]:
        """Logical name -> read-only blob path, for loading state without copying anything.
        Never write through these paths: blobs are shared between snapshots."""
        if verify:
            report = self.verify(snap)
            if not report.ok:
                raise SnapshotCorruptError(snap.ref, report.problems)
        self._touch(snap)
        return {name: self.blob_path(e.sha256) for name, e in snap.files.items()}

    def restore(
        self, snap: SnapshotInfo, target: Path | str, *, mode: str = "auto", verify: bool = True
    ) -> Path:
        """Materialise a snapshot's files under ``target`` (must not exist or be empty).

        ``mode``: "link" hardlinks blobs (instant, no extra space; files are read-only and shared
        with the cache — replace, never edit them in place), "copy" copies, "auto" links and falls
        back to copying across filesystems. Built in a sibling folder and renamed into place."""
        if mode not in ("auto", "link", "copy"):
            raise InputError(f"Restore mode {mode!r} is not one of auto, link, copy.")
        target = Path(target)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise InputError(
                f"Restore target {target} exists and is not empty.",
                hint="Choose a new folder or remove it first.",
            )
        sources = self.open_files(snap, verify=verify)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.restoring.{uuid.uuid4().hex[:8]}"
        try:
            for name, blob in sources.items():
                dest = staging.joinpath(*name.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                _materialise(blob, dest, mode)
            (staging / RESTORE_INFO_NAME).write_text(
                json.dumps(
                    {
                        "ref": snap.ref,
                        "step": snap.step,
                        "stage": snap.stage,
                        "phase": snap.phase,
                        "metrics": snap.metrics,
                        "created_at": snap.created_at,
                    },
                    indent=1,
                )
                + "\n",
                encoding="utf-8",
            )
            if target.exists():
                target.rmdir()
            os.rename(staging, target)
            _fsync_dir(target.parent, strict=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _touch(self, snap: SnapshotInfo) -> None:
        with contextlib.suppress(OSError):
            os.utime(snap.path / MARKER_NAME)

    # ------------------------------------------------------------------ pinning

    def pin(self, snap: SnapshotInfo, reason: str = "manual") -> None:
        """Protect a snapshot from eviction (an empty ``PIN-<reason>`` file; content untouched)."""
        p = snap.path / f"{PIN_PREFIX}{check_name('pin reason', reason)}"
        p.touch()
        _fsync_dir(snap.path, strict=True)

    def unpin(self, snap: SnapshotInfo, reason: str = "manual") -> None:
        with contextlib.suppress(FileNotFoundError):
            (snap.path / f"{PIN_PREFIX}{check_name('pin reason', reason)}").unlink()
            _fsync_dir(snap.path, strict=True)

    # ------------------------------------------------------------------ accounting and gc

    def stored_bytes(self) -> int:
        """Bytes on disk in blobs and snapshot folders (each blob counted once)."""
        total = 0
        for d in (self.blobs_dir, self.snapshots_dir):
            if d.is_dir():
                total += sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        return total

    def dedup_stats(self, run_id: str | None = None) -> dict[str, int]:
        """Logical bytes (sum over snapshots of their files) vs unique blob bytes they reference."""
        snaps = self.list(run_id)
        unique: dict[str, int] = {}
        for s in snaps:
            for e in s.files.values():
                unique[e.sha256] = e.size
        logical = sum(s.logical_bytes for s in snaps)
        return {
            "snapshots": len(snaps),
            "logical_bytes": logical,
            "unique_bytes": sum(unique.values()),
            "saved_bytes": logical - sum(unique.values()),
        }

    def gc(self, *, budget_bytes: int | None = None, staging_max_age_s: float = 24 * 3600) -> GcReport:
        """Remove leftovers of interrupted commits, evict least-recently-used unpinned snapshots
        until the store fits ``budget_bytes``, then delete blobs no snapshot references."""
        report = GcReport(budget_bytes=budget_bytes)
        with self._lock():
            self._ensure_layout()
            report.removed_staging = self._remove_stale_staging(staging_max_age_s)
            for path in self.incomplete():
                shutil.rmtree(path, ignore_errors=True)
                report.removed_incomplete.append(f"{path.parent.name}/{path.name}")
            report.removed_blobs, report.freed_bytes = self._remove_unreferenced_blobs()
            if budget_bytes is not None:
                self._evict_to_budget(budget_bytes, report)
            report.stored_bytes = self.stored_bytes()
        return report

    def _remove_stale_staging(self, max_age_s: float) -> list[str]:
        removed = []
        now = time.time()
        for p in self.tmp_dir.iterdir():
            parts = p.name.split(".")
            pid = int(parts[-2]) if len(parts) >= 2 and parts[-2].isdigit() else None
            stale = (
                pid is None
                or pid == os.getpid()
                or not pid_alive(pid)
                or now - p.stat().st_mtime > max_age_s
            )
            if stale:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    def _referenced(self) -> set[str]:
        """Blobs referenced by any snapshot folder with a readable manifest (complete or not yet
        removed); unreadable manifests are skipped, so their blobs may go."""
        refs: set[str] = set()
        for run in self.runs():
            for path in self._snapshot_dirs(run):
                with contextlib.suppress(SnapshotCorruptError):
                    refs.update(e.sha256 for e in self._read_info(path).files.values())
        return refs

    def _remove_unreferenced_blobs(self) -> tuple[int, int]:
        refs = self._referenced()
        count = freed = 0
        for blob in self.blobs_dir.glob("*/*"):
            if blob.name not in refs:
                freed += blob.stat().st_size
                blob.unlink()
                count += 1
        return count, freed

    def _evict_to_budget(self, budget: int, report: GcReport) -> None:
        """Evict unpinned snapshots, least recently used first. The newest snapshot of each run is
        kept too: it is the resume point, and the one a commit just wrote."""
        snaps = self.list()
        newest = {s.run_id: s.ref for s in snaps}  # list() is oldest first
        candidates = sorted(
            (s for s in snaps if not s.pinned and newest[s.run_id] != s.ref),
            key=lambda s: (s.last_used_ns, s.created_ns),
        )
        for snap in candidates:
            if self.stored_bytes() <= budget:
                break
            # Remove the marker first: a crash mid-delete leaves an incomplete (never chosen) folder.
            (snap.path / MARKER_NAME).unlink(missing_ok=True)
            _fsync_dir(snap.path, strict=True)
            shutil.rmtree(snap.path, ignore_errors=True)
            report.evicted.append(snap.ref)
            blobs, freed = self._remove_unreferenced_blobs()
            report.removed_blobs += blobs
            report.freed_bytes += freed


def _materialise(blob: Path, dest: Path, mode: str) -> None:
    if mode in ("auto", "link"):
        try:
            os.link(blob, dest)
            return
        except OSError as exc:
            if mode == "link" or exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    shutil.copyfile(blob, dest)


def default_cache_root(output_dir: Path | str = "runs") -> Path:
    """The cache lives beside the run folders: ``<output_dir>/.checkpoints`` (a dot name no run id can take)."""
    env = os.environ.get("SCALER_WIZARD_CACHE_DIR")
    return Path(env) if env else Path(output_dir) / CACHE_DIRNAME
