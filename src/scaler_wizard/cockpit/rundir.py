"""Reading a run directory for the cockpit, and writing operator commands into it.

No web imports: the cockpit server uses this, and so can the training job (``read_control``)
and the CLI. Everything here is *tolerant*: a run directory is written live by another process,
so a missing or half-written file reads as "not there yet", never as an error.

Names that come from a URL (run ids, snapshot ids) are validated before they touch the file
system: a plain folder name, no separators, no leading dot, and the resolved path must stay inside
the runs folder (MLflow's path-traversal CVEs are the cautionary tale, see REFERENCES.md).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..telemetry.reader import read_jsonl

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
    """``runs_dir/run_id`` after validation; refuses symlinks that lead outside ``runs_dir``."""
    check_name("run id", run_id)
    root = Path(runs_dir).resolve()
    path = (root / run_id).resolve()
    if path.parent != root:
        raise InputError(f"Run {run_id!r} resolves outside the runs folder {root}; refusing to read it.")
    if not path.is_dir():
        raise RunNotFoundError(f"No run {run_id!r} in {root}.", hint="List runs at /api/runs.")
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None while it is missing, half-written or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_records(path: Path) -> list[dict[str, Any]]:
    """Complete JSON Lines records (torn tail and corrupt lines skipped); [] when missing."""
    if not Path(path).is_file():
        return []
    try:
        return read_jsonl(path).records
    except InputError:
        return []


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------- run summaries


def latest_telegram(run_dir: Path) -> dict[str, Any] | None:
    """telegram.json (the latest, replaced atomically) or else the last line of telegrams.jsonl."""
    telegram = read_json(run_dir / "telegram.json")
    if telegram is not None:
        return telegram
    history = read_records(run_dir / "telegrams.jsonl")
    return history[-1] if history else None


def run_summary(run_dir: Path) -> dict[str, Any]:
    status = read_json(run_dir / "status.json") or {}
    telegram = latest_telegram(run_dir)
    try:
        mtime = max(p.stat().st_mtime for p in run_dir.iterdir())
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
    if contract_dir.is_dir():
        for p in sorted(contract_dir.glob("*.json")):
            data = read_json(p)
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
    envelope = read_json(run_dir / "envelope.json")
    return {
        "run_id": run_dir.name,
        "status": read_json(run_dir / "status.json"),
        "envelope": envelope,
        "summary": read_json(run_dir / "summary.json"),
        "telegram": latest_telegram(run_dir),
        "stages": stages_from_metrics(read_records(run_dir / "metrics.jsonl")),
        "contract": contract_badge(run_dir, envelope),
        "snapshots": list_snapshots(run_dir, cache_root),
    }


# ---------------------------------------------------------------------------- snapshots


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
    cache_root = Path(cache_root) if cache_root is not None else run_dir.parent / CACHE_DIRNAME
    cached = cache_root / "snapshots" / run_dir.name
    if cached.is_dir():
        for d in sorted(cached.iterdir()):
            manifest = read_json(d / "manifest.json")
            if manifest is not None and (d / "COMPLETE").is_file():
                entry = _snapshot_entry(manifest, d.name, d, "cache")
                if entry:
                    found.setdefault(entry["snapshot_id"], entry)
    folder = run_dir / "snapshots"
    if folder.is_dir():
        for d in sorted(p for p in folder.iterdir() if p.is_dir()):
            meta = next((m for m in (read_json(d / n) for n in ("manifest.json", "meta.json", "snapshot.json")) if m), {})
            entry = _snapshot_entry(meta, d.name, d, "run folder")
            if entry:
                found.setdefault(entry["snapshot_id"], entry)
    for listing in (folder / "manifest.json", run_dir / "snapshots.json"):
        try:
            data = json.loads(listing.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        items = data.get("snapshots") if isinstance(data, dict) else data
        for i, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict):
                entry = _snapshot_entry(item, f"snapshot-{i}", listing, "manifest")
                if entry:
                    found.setdefault(entry["snapshot_id"], entry)
    return sorted(found.values(), key=lambda s: (s["step"] if isinstance(s["step"], int) else -1, s["snapshot_id"]))


# ---------------------------------------------------------------------------- control


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one ``write`` (readers never see half a line) and fsync it: an
    operator's command must survive a crash of the cockpit right after it answered."""
    line = (json.dumps(record, allow_nan=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def append_control(run_dir: Path, action: str, args: dict[str, Any] | None = None,
                   source: str = "cockpit") -> dict[str, Any]:
    """Append ``{"timestamp", "action", "args", "source"}`` to ``control.jsonl``."""
    if action not in ACTIONS:
        raise InputError(f"Unknown control action {action!r}; use one of {', '.join(ACTIONS)}.")
    record = {"timestamp": utc_now(), "action": action, "args": dict(args or {}), "source": source}
    append_jsonl(Path(run_dir) / "control.jsonl", record)
    return record


def read_control(run_dir: Path) -> list[dict[str, Any]]:
    """Every operator command of a run so far (the training job polls this, or uses
    ``telemetry.reader.JsonlTail(run_dir / "control.jsonl")`` to see only new ones)."""
    return [r for r in read_records(Path(run_dir) / "control.jsonl") if r.get("action") in ACTIONS]
