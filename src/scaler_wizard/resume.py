"""Finding where an interrupted run can continue (``scaler-wizard run --resume RUN``).

A run is resumable when its folder says it did not complete, no live process still owns it,
its recorded recipe is unchanged, and the checkpoint cache holds a snapshot of it that verifies.
The newest such snapshot is the resume point; its ``data/position.json`` says where in the
stage loop it was taken (:class:`RunPosition`). Snapshots that do not verify (a kill inside a
commit, a flipped byte) are skipped by ``CheckpointCache.latest_valid``, never chosen. A run
interrupted before its first snapshot (nothing trained yet) resumes from the start of its loop.

Everything here only reads; the pipeline does the resuming.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, PlanError

POSITION_SCHEMA_VERSION = 1


@dataclass
class RunPosition:
    """Where the stage loop was when a snapshot was taken (stored in the snapshot as JSON).

    ``complete``: the stage ``stage`` is finished (probed, gated); the next stage starts fresh.
    Otherwise attempt ``attempt`` of stage ``stage`` had taken ``stage_step`` optimizer steps
    (0: the stage-start snapshot), having begun at global step ``attempt_start_step``.
    ``model_length``: the length whose position encoding the snapshot's weights go with (a
    resumed run applies it before anything else, so weights and positions stay a pair);
    ``finished``: the stage loop is over (every stage ran, or a gate ended the run).
    """

    stage: int
    complete: bool
    attempt: int = 1
    stage_step: int = 0
    attempt_start_step: int = 0
    global_step: int = 0
    steps_trained: int = 0
    learning_rate: float = 0.0
    stage_start_snapshot: str | None = None
    trainer_state: str | None = None
    envelope: dict[str, Any] | None = None  # SafetyEnvelope.state_dict(): rolling windows, rollbacks used
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    first_losses: list[float] = field(default_factory=list)
    last_losses: list[float] = field(default_factory=list)
    model_length: int = 0
    finished: bool = False
    work: dict[str, Any] | None = None  # the approval's work budget done (steps, tokens)
    schema_version: int = POSITION_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> RunPosition:
        if int(data.get("schema_version", 0)) != POSITION_SCHEMA_VERSION:
            raise PlanError(f"Snapshot {where} has a run position of schema {data.get('schema_version')}, "
                            f"this version reads {POSITION_SCHEMA_VERSION}.",
                            hint="Resume with the scaler-wizard version that wrote the run.")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ResumePoint:
    run_dir: Path
    recipe_file: Path
    recipe_dir: Path
    recipe_digest: str
    snapshot: Any  # cache.checkpoints.SnapshotInfo; None: no snapshot yet (restart the loop)
    position: RunPosition | None
    status: dict[str, Any]


def resolve_run_dir(target: str | Path, output_dir: str | Path = "runs") -> Path:
    """A run folder path, or a run id under ``output_dir``."""
    path = Path(target).expanduser()
    if path.is_dir():
        return path.resolve()
    candidate = Path(output_dir) / str(target)
    if candidate.is_dir():
        return candidate.resolve()
    raise InputError(f"No run folder {target} (looked at {path} and {candidate}).",
                     hint="Pass the run directory printed when the run started, e.g. runs/demo-20261129-101500.")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} is missing: this folder is not a Scaler Wizard run ({what}).",
                         hint="Pass the run directory itself.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}).") from None


def find_resume_point(target: str | Path, output_dir: str | Path = "runs") -> ResumePoint:
    """Check that the run can be resumed and pick its newest valid snapshot."""
    from .cache.checkpoints import CheckpointCache, default_cache_root, pid_alive
    from .cache.state import read_data_position
    from .run_record import FINISHED_STATES
    run_dir = resolve_run_dir(target, output_dir)
    status = _read_json(run_dir / "status.json", "status.json")
    envelope = _read_json(run_dir / "envelope.json", "envelope.json")
    state = status.get("state")
    if state in FINISHED_STATES or (run_dir / "summary.json").exists():
        raise PlanError(f"Run {run_dir.name} completed; there is nothing to resume.",
                        hint="Start a new run to train further.")
    if state in ("awaiting_approval", "rejected"):
        raise PlanError(f"Run {run_dir.name} never started training (state: {state}).",
                        hint="Start a new run with an approved contract.")
    pid = status.get("pid")
    if state == "running" and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
        raise PlanError(f"Run {run_dir.name} is still running (process {pid}).",
                        hint="Stop it first (cockpit abort, or kill the process), then resume.")
    recipe_file = run_dir / "recipe.resolved.yaml"
    if not recipe_file.is_file() or "recipe_dir" not in envelope:
        raise PlanError(f"Run {run_dir.name} lacks recipe.resolved.yaml or the recipe folder in envelope.json "
                        "(written by an older version).", hint="Start a new run.")
    cache = CheckpointCache(default_cache_root(run_dir.parent))
    snap = cache.latest_valid(run_dir.name)
    if snap is None:
        # Interrupted before the first stage-start snapshot (loading, base probes, adding
        # capacity): nothing was trained, so the run restarts its loop from the beginning.
        return ResumePoint(run_dir, recipe_file, Path(envelope["recipe_dir"]), envelope.get("recipe_digest", ""),
                           None, None, status)
    files = cache.open_files(snap, verify=False)  # latest_valid verified it
    saved = read_data_position(files)
    if saved is None:
        raise PlanError(f"Snapshot {snap.ref} holds no run position (not written by the pipeline).",
                        hint="Roll back with `scaler-wizard rollback` instead, or start a new run.")
    position = RunPosition.from_json(saved, snap.ref)
    return ResumePoint(run_dir, recipe_file, Path(envelope["recipe_dir"]), envelope.get("recipe_digest", ""),
                       snap, position, status)
