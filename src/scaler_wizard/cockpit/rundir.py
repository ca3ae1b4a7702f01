"""Reading a run directory for the cockpit, and writing operator commands into it.

No web imports: the cockpit server uses this, and so can the training job (``read_control``)
and the CLI. Everything here is *tolerant*: a run directory is written live by another process,
so a missing or half-written file reads as "not there yet", never as an error.

Names that come from a URL (run ids, snapshot ids) are validated before they touch the file
system: a plain folder name, no separators, no leading dot, and the resolved path must stay inside
the runs folder (MLflow's path-traversal CVEs are the cautionary tale, see REFERENCES.md).

Every file under a run folder is opened *beneath* the runs folder (:func:`open_beneath`): each
folder on the way is opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent's
descriptor and the file itself with ``O_NOFOLLOW``, and only a regular file (checked with
``fstat`` on the descriptor) is read or written. A symlink anywhere below the runs folder
(``status.json -> /etc/passwd``, ``control.jsonl -> ~/.bashrc``, ``snapshots -> /``) is
therefore never followed, for reading, for the event stream, and for appends.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fsutil import utc_now
from ..telemetry.reader import parse_line

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ACTIONS = ("approve", "abort", "rollback")
CACHE_DIRNAME = ".checkpoints"  # the checkpoint cache's default root beside the runs (cache/checkpoints.py)


class RunNotFoundError(InputError):
    """The run id is well formed but no such run folder exists."""


def check_name(kind: str, value: str) -> str:
    """A single, plain path component or an InputError naming what was wrong."""
    if not isinstance(value, str) or not SAFE_NAME.match(value) or ".." in value:
        raise InputError(
            f"Invalid {kind} {value!r}: use letters, digits, '.', '_' or '-' (at most 128, "
            "not starting with '.' and without '..').")
    return value


def resolve_run_dir(runs_dir: Path, run_id: str) -> Path:
    """``runs_dir/run_id`` after validation; refuses a run folder that is a symlink, or that
    resolves outside ``runs_dir``."""
    check_name("run id", run_id)
    root = Path(runs_dir).resolve()
    if (root / run_id).is_symlink():
        raise InputError(f"Run {run_id!r} is a symbolic link in {root}; it is not followed.")
    path = (root / run_id).resolve()
    if path.parent != root:
        raise InputError(f"Run {run_id!r} resolves outside the runs folder {root}; refusing to read it.")
    if not path.is_dir():
        raise RunNotFoundError(f"No run {run_id!r} in {root}.", hint="List runs at /api/runs.")
    return path


# ---------------------------------------------------------------------------- no-follow file access

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
MAX_JSON_BYTES = 16 * 1024 * 1024  # a status / manifest / telegram file is small


def _parts_beneath(root: Path, path: Path) -> tuple[str, list[str]]:
    """(absolute root, path components below it); refuses a path that is not lexically below the
    root or that climbs with '..'."""
    root_abs = os.path.abspath(root)
    path_abs = os.path.abspath(path)
    rel = os.path.relpath(path_abs, root_abs)
    parts = Path(rel).parts
    if not parts or rel == "." or ".." in parts or os.path.isabs(rel):
        raise OSError(errno.EACCES, f"{path} is not inside {root}")
    return root_abs, list(parts)


def open_beneath(root: Path, path: Path, flags: int = os.O_RDONLY, mode: int = 0o644, *,
                 create_dirs: bool = False) -> int:
    """A descriptor of the regular file ``path`` reached from ``root`` without following any symlink
    on the way (each folder opened ``O_NOFOLLOW|O_DIRECTORY`` relative to its parent, the file
    ``O_NOFOLLOW|O_NONBLOCK``, then ``fstat``: only a regular file is returned; a FIFO never blocks).
    The resolved path must also lie inside the resolved root. Raises OSError (ELOOP for a symlink,
    EINVAL for a file that is not regular, ENOENT when missing)."""
    root_abs, parts = _parts_beneath(root, path)
    real_root = os.path.realpath(root_abs)
    fd = os.open(root_abs, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        for comp in parts[:-1]:
            try:
                nfd = os.open(comp, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not create_dirs:
                    raise
                os.mkdir(comp, 0o700, dir_fd=fd)
                nfd = os.open(comp, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        out = os.open(parts[-1], flags | _NOFOLLOW | _CLOEXEC | _NONBLOCK, mode, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        if not stat.S_ISREG(os.fstat(out).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        real = os.path.realpath(os.path.abspath(path))
        if os.path.commonpath([real, real_root]) != real_root:
            raise OSError(errno.EACCES, f"{path} resolves outside {root}")
        os.set_blocking(out, True)
    except BaseException:
        os.close(out)
        raise
    return out


def open_dir_beneath(root: Path, path: Path, *, create: bool = False) -> int:
    """A descriptor of the folder ``path`` below ``root``, every component opened ``O_NOFOLLOW |
    O_DIRECTORY`` from its parent (created 0700 when missing and ``create``). Raises OSError."""
    root_abs, parts = _parts_beneath(root, path)
    fd = os.open(root_abs, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        for comp in parts:
            try:
                nfd = os.open(comp, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(comp, 0o700, dir_fd=fd)
                nfd = os.open(comp, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes_beneath(root: Path, path: Path, limit: int | None = None) -> bytes | None:
    """The bytes of a regular file under ``root`` (no symlink followed), or None when it is missing,
    not a regular file, a symlink, over ``limit`` or unreadable."""
    try:
        fd = open_beneath(root, path)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if limit is not None and os.fstat(fh.fileno()).st_size > limit:
            return None
        return fh.read() if limit is None else fh.read(limit + 1)


def _root_of(path: Path, root: Path | None) -> Path:
    """Default root: the runs folder, i.e. the parent of the run folder ``path`` lies in."""
    return Path(root) if root is not None else Path(path).parent.parent


def read_json(path: Path, root: Path | None = None) -> dict[str, Any] | None:
    """A JSON object file under ``root`` (default: the runs folder above the run folder holding
    ``path``), or None while it is missing, half-written, not an object, or not a regular file."""
    data = read_bytes_beneath(_root_of(path, root), Path(path), MAX_JSON_BYTES)
    if data is None or len(data) > MAX_JSON_BYTES:
        return None
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def split_records(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """(complete JSON object lines, bytes consumed up to the last newline); torn tail and corrupt
    lines are skipped."""
    end = data.rfind(b"\n")
    if end < 0:
        return [], 0
    out = []
    for raw in data[: end + 1].split(b"\n"):
        if raw.strip():
            record, _ = parse_line(raw)
            if record is not None:
                out.append(record)
    return out, end + 1


def read_records(path: Path, root: Path | None = None) -> list[dict[str, Any]]:
    """Complete JSON Lines records (torn tail and corrupt lines skipped); [] when missing or when
    the file is a symlink or not a regular file."""
    data = read_bytes_beneath(_root_of(path, root), Path(path))
    if not data:
        return []
    return split_records(data)[0]


class SafeJsonlTail:
    """``telemetry.reader.JsonlTail`` for the cockpit: each poll reopens the file beneath the runs
    folder (no symlink followed), starts over when the file is replaced or truncated, and returns
    the records whose newline has arrived."""

    def __init__(self, path: Path, root: Path):
        self.path, self.root = Path(path), Path(root)
        self._offset = 0
        self._inode: int | None = None

    def poll(self) -> list[dict[str, Any]]:
        try:
            fd = open_beneath(self.root, self.path)
        except OSError:
            if self._inode is not None:
                self._offset, self._inode = 0, None
            return []
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if (self._inode is not None and st.st_ino != self._inode) or st.st_size < self._offset:
                self._offset = 0
            self._inode = st.st_ino
            if st.st_size == self._offset:
                return []
            fh.seek(self._offset)
            data = fh.read(st.st_size - self._offset)
        records, consumed = split_records(data)
        self._offset += consumed
        return records


# ---------------------------------------------------------------------------- run summaries


def latest_telegram(run_dir: Path) -> dict[str, Any] | None:
    """telegram.json (the latest, replaced atomically) or else the last line of telegrams.jsonl."""
    telegram = read_json(run_dir / "telegram.json", run_dir.parent)
    if telegram is not None:
        return telegram
    history = read_records(run_dir / "telegrams.jsonl", run_dir.parent)
    return history[-1] if history else None


def run_summary(run_dir: Path) -> dict[str, Any]:
    status = read_json(run_dir / "status.json", run_dir.parent) or {}
    telegram = latest_telegram(run_dir)
    try:
        mtime = max(p.lstat().st_mtime for p in run_dir.iterdir())
    except (OSError, ValueError):
        mtime = 0.0
    return {
        "run_id": run_dir.name,
        "state": status.get("state", "unknown"),
        "stage": status.get("stage"),
        "stages": status.get("stages"),
        "length": status.get("length"),
        "action": telegram.get("action") if telegram else None,
        "updated": datetime.fromtimestamp(mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if mtime else None,
    }


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run folder (dot folders such as the checkpoint cache excluded), newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [run_summary(p) for p in root.iterdir()
            if p.is_dir() and not p.is_symlink() and SAFE_NAME.match(p.name)]
    return sorted(runs, key=lambda r: (r["updated"] or "", r["run_id"]), reverse=True)


def stages_from_metrics(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stage timeline: one entry per ``gate/passed`` event, with the probe results
    (``eval/*``, ``probe/*``) logged at the same step and stage."""
    records = list(records)
    out = []
    for r in records:
        if r.get("metric") != "gate/passed":
            continue
        probes = {e["metric"]: e.get("value") for e in records
                  if e.get("step") == r.get("step") and e.get("stage") == r.get("stage")
                  and str(e.get("metric", "")).startswith(("eval/", "probe/"))}
        out.append({"stage": r.get("stage"), "step": r.get("step"), "passed": bool(r.get("value")),
                    "decision": r.get("decision"), "reasons": r.get("reasons") or [], "probes": probes,
                    "timestamp": r.get("timestamp")})
    return out


def contract_badge(run_dir: Path, envelope: dict[str, Any] | None) -> dict[str, Any]:
    """Who approved the run and whether the approval was verified, from whatever the contract
    gatekeeper left: ``envelope.json["contract"]`` or a JSON file in ``contract/``."""
    sources: list[dict[str, Any]] = []
    if envelope and isinstance(envelope.get("contract"), dict):
        sources.append(envelope["contract"])
    contract_dir = run_dir / "contract"
    if contract_dir.is_dir() and not contract_dir.is_symlink():
        for p in sorted(contract_dir.glob("*.json")):
            data = read_json(p, run_dir.parent)
            if data:
                sources.append(data)
    badge: dict[str, Any] = {"present": bool(sources) or contract_dir.is_dir(), "approved_by": None, "verified": None}
    for data in sources:
        for key in ("approved_by", "approver", "signer", "subject"):
            if badge["approved_by"] is None and isinstance(data.get(key), str):
                badge["approved_by"] = data[key]
        for key in ("verified", "valid"):
            if badge["verified"] is None and isinstance(data.get(key), bool):
                badge["verified"] = data[key]
    return badge


def run_detail(run_dir: Path, cache_root: Path | None = None) -> dict[str, Any]:
    root = run_dir.parent
    envelope = read_json(run_dir / "envelope.json", root)
    return {
        "run_id": run_dir.name,
        "status": read_json(run_dir / "status.json", root),
        "envelope": envelope,
        "summary": read_json(run_dir / "summary.json", root),
        "telegram": latest_telegram(run_dir),
        "stages": stages_from_metrics(read_records(run_dir / "metrics.jsonl", root)),
        "contract": contract_badge(run_dir, envelope),
        "snapshots": list_snapshots(run_dir, cache_root),
    }


# ---------------------------------------------------------------------------- snapshots


def _real_dir(path: Path, root: Path) -> bool:
    """A folder below ``root`` reached without any symlink (so listing it lists nothing outside)."""
    try:
        _, parts = _parts_beneath(root, path)
    except OSError:
        return False
    here = Path(os.path.abspath(root))
    for comp in parts:
        here = here / comp
        try:
            if not stat.S_ISDIR(os.lstat(here).st_mode):
                return False
        except OSError:
            return False
    return True


def _snapshot_entry(data: dict[str, Any], fallback_id: str, path: Path, origin: str) -> dict[str, Any] | None:
    sid = str(data.get("snapshot_id") or data.get("id") or data.get("name") or fallback_id)
    if not SAFE_NAME.match(sid):
        return None
    return {"snapshot_id": sid, "step": data.get("step"), "stage": data.get("stage"), "phase": data.get("phase"),
            "metrics": data.get("metrics") if isinstance(data.get("metrics"), dict) else {},
            "created_at": data.get("created_at"), "path": str(data.get("path") or path), "origin": origin}


def list_snapshots(run_dir: Path, cache_root: Path | None = None) -> list[dict[str, Any]]:
    """Cached snapshots a rollback can choose from, from any of the places they may be described:

    * the checkpoint cache: ``<cache_root>/snapshots/<run_id>/<id>/manifest.json`` with its
      ``COMPLETE`` marker (incomplete snapshots are never offered);
    * ``runs/<id>/snapshots/<name>/`` folders (metadata from ``manifest.json``, ``meta.json`` or
      ``snapshot.json`` inside, if any);
    * a list in ``runs/<id>/snapshots/manifest.json`` or ``runs/<id>/snapshots.json``
      (a JSON list, or an object with a ``snapshots`` list).

    Sorted by step; the same id is listed once (the cache wins).
    """
    found: dict[str, dict[str, Any]] = {}
    runs_root = run_dir.parent
    # the default cache lives in the runs folder and is walked from it (no symlink); an explicit
    # cache root is the operator's choice and is walked from there
    cache_walk_root = Path(cache_root) if cache_root is not None else runs_root
    cache_root = Path(cache_root) if cache_root is not None else runs_root / CACHE_DIRNAME
    cached = cache_root / "snapshots" / run_dir.name
    if _real_dir(cached, cache_walk_root):
        for d in sorted(p for p in cached.iterdir() if _real_dir(p, cache_walk_root)):
            manifest = read_json(d / "manifest.json", cache_walk_root)
            complete = read_bytes_beneath(cache_walk_root, d / "COMPLETE", 4096) is not None
            if manifest is not None and complete:
                entry = _snapshot_entry(manifest, d.name, d, "cache")
                if entry:
                    found.setdefault(entry["snapshot_id"], entry)
    folder = run_dir / "snapshots"
    if _real_dir(folder, runs_root):
        for d in sorted(p for p in folder.iterdir() if _real_dir(p, runs_root)):
            meta = next((m for m in (read_json(d / n, runs_root) for n in ("manifest.json", "meta.json",
                                                                             "snapshot.json")) if m), {})
            entry = _snapshot_entry(meta, d.name, d, "run folder")
            if entry:
                found.setdefault(entry["snapshot_id"], entry)
    for listing in (folder / "manifest.json", run_dir / "snapshots.json"):
        raw = read_bytes_beneath(runs_root, listing, MAX_JSON_BYTES)
        if raw is None:
            continue
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        items = data.get("snapshots") if isinstance(data, dict) else data
        for i, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict):
                entry = _snapshot_entry(item, f"snapshot-{i}", listing, "manifest")
                if entry:
                    found.setdefault(entry["snapshot_id"], entry)
    return sorted(found.values(), key=lambda s: (s["step"] if isinstance(s["step"], int) else -1, s["snapshot_id"]))


# ---------------------------------------------------------------------------- control


def append_jsonl(path: Path, record: dict[str, Any], root: Path | None = None, *, fsync: bool = True,
                 create_dirs: bool = False) -> None:
    """Append one record as one ``write`` (readers never see half a line) to a regular file beneath
    ``root`` (default: the runs folder above the run folder of ``path``), never through a symlink,
    and fsync it: an operator's command must survive a crash of the cockpit right after it answered."""
    line = (json.dumps(record, allow_nan=False, default=str) + "\n").encode("utf-8")
    fd = open_beneath(_root_of(path, root), Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600,
                      create_dirs=create_dirs)
    try:
        os.write(fd, line)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def append_control(run_dir: Path, action: str, args: dict[str, Any] | None = None,
                   source: str = "cockpit") -> dict[str, Any]:
    """Append ``{"timestamp", "action", "args", "source"}`` to ``control.jsonl`` (no symlink followed:
    a ``control.jsonl`` that is a link is refused with an InputError)."""
    if action not in ACTIONS:
        raise InputError(f"Unknown control action {action!r}; use one of {', '.join(ACTIONS)}.")
    record = {"timestamp": utc_now(), "action": action, "args": dict(args or {}), "source": source}
    run_dir = Path(run_dir)
    try:
        append_jsonl(run_dir / "control.jsonl", record, run_dir.parent)
    except OSError as exc:
        raise InputError(f"Cannot append to {run_dir / 'control.jsonl'}: it is not a regular file inside the runs "
                         f"folder ({exc.strerror or exc}); nothing was written.") from None
    return record


def read_control(run_dir: Path) -> list[dict[str, Any]]:
    """Every operator command of a run so far (the training job polls this, or uses
    ``telemetry.reader.JsonlTail(run_dir / "control.jsonl")`` to see only new ones)."""
    run_dir = Path(run_dir)
    return [r for r in read_records(run_dir / "control.jsonl", run_dir.parent) if r.get("action") in ACTIONS]
