"""`scaler-wizard` command line. Errors are handled here only: each ScalerWizardError becomes a
one-paragraph message and its exit code (2 bad input, 3 contract, 4 halted; 5: the run completed
but failed its gates); tracebacks only with --debug."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import RecipeError, ScalerWizardError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Grow a language model's capacity and context.")
console = Console(stderr=False)
err_console = Console(stderr=True, soft_wrap=True)  # long paths stay greppable
_state = {"debug": False}


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    _state["debug"] = debug


class RichReporter:
    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task = None

    def phase(self, text: str) -> None:
        console.print(f"[bold cyan]>[/] {text}")

    def start_training(self, stage, total_steps: int) -> None:
        self._progress = Progress(
            TextColumn(f"stage {stage.index} @ {stage.length} tokens"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps)

    def advance_training(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def end_training(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _verdict_line(summary: dict) -> str:
    if summary.get("verdict") == "passed":
        return f"[bold green]PASSED[/]: every gate passed; the model reached {summary['reached_length']} tokens."
    reasons = "; ".join(summary.get("verdict_reasons") or []) or "see the stages"
    return (f"[bold red]GATES FAILED[/]: the run ended at {summary.get('reached_length')} of "
            f"{summary.get('target_length')} tokens ({reasons}).")


def _summary_table(summary: dict) -> Table:
    table = Table(title=f"run {summary['run_id']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    passed = summary.get("verdict") == "passed"
    table.add_row("verdict", "[bold green]passed[/]" if passed else "[bold red]gates failed[/]")
    for k, v in summary["headline"].items():
        table.add_row(k, _fmt(v))
    table.add_row("stages", ", ".join(
        f"{s['length']}:{s['decision']}" if s["gate_passed"] else f"[red]{s['length']}:{s['decision']} (failed)[/]"
        for s in summary["stages"]))
    table.add_row("train loss first -> last", f"{_fmt(summary['train_loss_first'])} -> {_fmt(summary['train_loss_last'])}")
    table.add_row("wall time (s)", _fmt(summary.get("wall_time_s")))
    table.add_row("peak RSS (GB)", _fmt(summary.get("peak_rss_gb")))
    return table


@app.command()
def run(
    recipe: Path | None = typer.Argument(None, help="YAML recipe; default: the shipped demo recipe"),
    contract: Path | None = typer.Option(None, "--contract", help="signed contract approving this run"),
    self_approve: bool = typer.Option(
        False, "--self-approve", help="approve the run yourself with your local key (printed and audited)"
    ),
    approvers: Path | None = typer.Option(None, "--approvers", help="trusted-approvers file"),
    cockpit: bool = typer.Option(False, "--cockpit", help="serve the live cockpit on 127.0.0.1 during the run"),
    resume: str | None = typer.Option(
        None, "--resume", help="continue an interrupted run (its folder or id) from its newest valid snapshot"
    ),
) -> None:
    """Run a scaling recipe end to end (default: the embedded demo, 256 -> 1024 tokens)."""
    from .pipeline import run as run_pipeline

    if resume is not None and recipe is not None:
        from .errors import InputError

        raise InputError(f"Both a recipe ({recipe}) and --resume {resume} were given.",
                         hint="A resumed run keeps its own recipe: pass only --resume RUN.")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server = None
    if cockpit:
        from .cockpit.server import CockpitServer
        from .recipe import load_recipe, resolve_path

        if resume is not None:
            from .resume import resolve_run_dir

            runs_dir = resolve_run_dir(resume).parent
        else:
            parsed, _ = load_recipe(str(recipe) if recipe else None)
            runs_dir = resolve_path(parsed.run.output_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        from .cache.cache_cli import cockpit_rollback_handler

        server = CockpitServer(runs_dir, rollback_handler=cockpit_rollback_handler(runs_dir)).start()
        console.print(f"cockpit: {server.url}")
    try:
        result = run_pipeline(
            str(recipe) if recipe else None,
            reporter=RichReporter(),
            contract=contract,
            self_approve=self_approve,
            interactive=sys.stdin.isatty() and sys.stdout.isatty(),
            approvers=approvers,
            resume=resume,
        )
    finally:
        if server is not None:
            server.stop()
    if result.main_process:
        console.print(_verdict_line(result.summary))
        console.print(_summary_table(result.summary))
        console.print(f"run directory: {result.run_dir}")
        if result.summary.get("verdict") != "passed":
            from .errors import EXIT_GATES_FAILED

            raise typer.Exit(EXIT_GATES_FAILED)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="YAML recipe to check")) -> None:
    """Validate a recipe: its schema and its meaning (model folder, context method and its
    parameters, strategy options, probe files, data) -- the checks `run` makes before it writes
    anything; every problem is listed with its field path."""
    from .preflight import check_inputs, check_recipe

    parsed, recipe_dir = check_recipe(str(recipe))
    inputs = check_inputs(parsed, recipe_dir, source=str(recipe))
    stages = " -> ".join(str(s.length) for s in inputs.stages)
    console.print(f"[green]ok[/] {recipe}: recipe valid (digest {parsed.digest()[:12]}); "
                  f"stages {inputs.base_length} -> {stages}")


def _register_subcommands() -> None:
    from .cache.cache_cli import cache_app, rollback_command
    from .cockpit.cockpit_cli import cockpit
    from .distill.distill_cli import distill_app
    from .safety.contract_cli import contract_app
    from .scaling import plan_cli

    app.add_typer(contract_app, name="contract")
    app.add_typer(cache_app, name="cache")
    app.command("rollback")(rollback_command)
    app.command("cockpit")(cockpit)
    app.add_typer(distill_app, name="distill")
    app.command("hardware")(plan_cli.hardware)
    app.command("plan")(plan_cli.plan)


_register_subcommands()


def main() -> None:
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)  # click returns a typer.Exit's code instead of exiting in this mode
    except ScalerWizardError as exc:
        if _state["debug"]:
            raise
        if isinstance(exc, RecipeError):
            err_console.print(f"[bold red]error:[/] recipe {exc.source} has {len(exc.problems)} problem(s):")
            for path, msg in exc.problems:
                err_console.print(f"  - {path}: {msg}")
            if exc.hint:
                err_console.print(exc.hint)
        else:
            err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # usage errors: typer's own (vendored click) classes, or click's
        usage = _usage_error_exit_code(exc)
        if usage is None:
            raise
        sys.exit(usage)


def _usage_error_exit_code(exc: BaseException) -> int | None:
    """For a command-line usage error (unknown option, missing or bad argument) from typer or click:
    show its one-line message (no traceback) and return the exit code (2 for usage errors). None
    for anything else."""
    classes: list[type] = [typer.TyperException]
    try:
        import click

        classes += [click.ClickException]
        aborts: tuple[type, ...] = (click.exceptions.Abort,)
    except ImportError:  # pragma: no cover - typer vendors click
        aborts = ()
    if aborts and isinstance(exc, aborts):
        err_console.print("aborted")
        return 130
    if not isinstance(exc, tuple(classes)):
        return None
    show = getattr(exc, "show", None)
    if callable(show):
        show()
    else:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    code = getattr(exc, "exit_code", 2)
    return code if isinstance(code, int) and code != 1 else 2


if __name__ == "__main__":
    main()

