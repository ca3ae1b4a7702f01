"""`scaler-wizard cache list|verify|gc` and `scaler-wizard rollback RUN --to STEP|stage:K`.

Register in cli.py::

    from .cache.cache_cli import cache_app, rollback_command
    app.add_typer(cache_app, name="cache")
    app.command("rollback")(rollback_command)

Errors are raised as ScalerWizardError subclasses and become exit codes in ``cli.main``; a failed
verification exits 1 after listing every bad snapshot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import InputError
from .checkpoints import CheckpointCache, SnapshotInfo, default_cache_root

cache_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Inspect, verify and trim the checkpoint cache of snapshots.",
)
console = Console()

RootOpt = Annotated[
    Path | None,
    typer.Option("--root", help="cache root; default: $SCALER_WIZARD_CACHE_DIR or runs/.checkpoints"),
]
RunOpt = Annotated[str | None, typer.Option("--run", help="only this run id")]


def _cache(root: Path | None) -> CheckpointCache:
    return CheckpointCache(root if root is not None else default_cache_root())


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _metric_text(metrics: dict) -> str:
    parts = []
    for k, v in list(metrics.items())[:3]:
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


@cache_app.command("list")
def list_command(
    run: RunOpt = None,
    root: RootOpt = None,
) -> None:
    """List committed snapshots, oldest first, with stage, step, phase, size and pins."""
    cache = _cache(root)
    snaps = cache.list(run)
    table = Table(title=f"snapshots in {cache.root}")
    for col in ("run", "snapshot", "stage", "step", "phase", "size", "pinned", "metrics"):
        table.add_column(col)
    for s in snaps:
        pins = ",".join((["commit"] if s.pinned_at_commit else []) + list(s.pins)) or "-"
        table.add_row(
            s.run_id,
            s.snapshot_id,
            str(s.stage),
            str(s.step),
            s.phase,
            _fmt_bytes(s.logical_bytes),
            pins,
            _metric_text(s.metrics),
        )
    console.print(table)
    stats = cache.dedup_stats(run)
    console.print(
        f"{stats['snapshots']} snapshot(s), {_fmt_bytes(stats['logical_bytes'])} logical, "
        f"{_fmt_bytes(stats['unique_bytes'])} stored once ({_fmt_bytes(stats['saved_bytes'])} saved by dedup); "
        f"{len(cache.incomplete(run))} incomplete."
    )


@cache_app.command("verify")
def verify_command(
    run: RunOpt = None,
    root: RootOpt = None,
) -> None:
    """Re-hash every snapshot file; exit 1 if any snapshot is corrupt or incomplete."""
    cache = _cache(root)
    bad = 0
    for s in cache.list(run):
        report = cache.verify(s)
        if report.ok:
            console.print(f"[green]ok[/]   {s.ref} (step {s.step})")
        else:
            bad += 1
            console.print(f"[red]BAD[/]  {s.ref}: " + "; ".join(report.problems))
    for path in cache.incomplete(run):
        bad += 1
        console.print(
            f"[yellow]INCOMPLETE[/] {path.parent.name}/{path.name}: no completion marker (removed by gc)"
        )
    if bad:
        raise typer.Exit(1)


@cache_app.command("gc")
def gc_command(
    budget_gb: Annotated[
        float | None, typer.Option("--budget-gb", help="evict LRU unpinned snapshots above this size")
    ] = None,
    root: RootOpt = None,
) -> None:
    """Remove interrupted commits and unreferenced blobs; with --budget-gb, evict least recently
    used snapshots (never pinned ones: stage boundaries, last good)."""
    if budget_gb is not None and budget_gb < 0:
        raise InputError(f"--budget-gb must be >= 0, got {budget_gb}.")
    cache = _cache(root)
    report = cache.gc(budget_bytes=None if budget_gb is None else int(budget_gb * 1024**3))
    console.print(
        f"evicted {len(report.evicted)} snapshot(s), removed {len(report.removed_incomplete)} incomplete, "
        f"{len(report.removed_staging)} staging leftover(s), {report.removed_blobs} blob(s); "
        f"freed {_fmt_bytes(report.freed_bytes)}; stored {_fmt_bytes(report.stored_bytes)}."
    )
    if report.over_budget:
        console.print(
            "[yellow]warning:[/] pinned snapshots alone exceed the budget; unpin or raise the budget."
        )


def parse_rollback_target(to: str) -> dict[str, int | str]:
    """``"40"`` or ``"step:40"`` -> a step; ``"stage:2"`` -> the last valid snapshot of stage 2."""
    kind, sep, value = to.partition(":")
    if not sep:
        kind, value = "step", to
    if kind == "step" and value.isdigit():
        return {"step": int(value)}
    if kind == "stage" and value:
        return {"stage": int(value) if value.isdigit() else value}
    raise InputError(
        f"--to {to!r} is neither a step nor a stage.",
        hint="Use --to 40 (step 40), --to step:40, or --to stage:2 (last snapshot of stage 2).",
    )


def rollback_snapshot(cache: CheckpointCache, run: str, to: str) -> SnapshotInfo:
    """The snapshot ``rollback`` restores: the newest valid one matching ``to``."""
    return cache.find(run, **parse_rollback_target(to))  # type: ignore[arg-type]


def rollback_command(
    run: Annotated[str, typer.Argument(help="run id")],
    to: Annotated[str, typer.Option("--to", help="STEP, step:STEP or stage:K")],
    target: Annotated[
        Path | None,
        typer.Option("--target", help="folder to restore into; default runs/RUN/rollback/<snapshot>"),
    ] = None,
    copy: Annotated[bool, typer.Option("--copy", help="copy files instead of hardlinking them")] = False,
    root: RootOpt = None,
) -> None:
    """Restore a verified snapshot's files (trainable weights, optimizer, scheduler, RNG, data
    position) into a folder (hardlinks; copies across filesystems)."""
    cache = _cache(root)
    snap = rollback_snapshot(cache, run, to)
    dest = target if target is not None else Path("runs") / run / "rollback" / snap.snapshot_id
    cache.restore(snap, dest, mode="copy" if copy else "auto")
    console.print(
        f"[green]restored[/] {snap.ref} (stage {snap.stage}, step {snap.step}, {snap.phase}) "
        f"-> {dest} ({len(snap.files)} files)"
    )


def cockpit_rollback_handler(runs_dir: Path):
    """The cockpit's Rollback on a finished run: restore the chosen snapshot's files from the
    cache into ``runs/<run>/rollback/<snapshot>`` (the same place ``scaler-wizard rollback`` uses)."""
    from .checkpoints import CheckpointCache, default_cache_root

    def handler(run_dir: Path, snap: dict) -> dict:
        cache = CheckpointCache(default_cache_root(runs_dir))
        info = cache.get(run_dir.name, snap["snapshot_id"])
        dest = Path(run_dir) / "rollback" / info.snapshot_id
        cache.restore(info, dest)
        return {"path": str(dest), "files": len(info.files)}

    return handler
