"""The `scaler-wizard hardware` and `scaler-wizard plan` commands (typer functions; cli.py
registers them and maps our exceptions to exit codes)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .hardware import HardwareProfile, detect_hardware, load_hardware_profile
from .memory import GiB
from .profiles import USE_CASES, recommend, write_recommendation

console = Console()


def hardware(
    json_output: bool = typer.Option(False, "--json", help="print the profile as JSON (editable, reusable)"),
    output_dir: Path = typer.Option(Path("runs"), "--output-dir", help="where runs go (its free disk is reported)"),
) -> None:
    """Show this machine's GPUs, memory and disk as the planner sees them (unknowns say so)."""
    profile = detect_hardware(output_dir)
    if json_output:
        typer.echo(json.dumps(profile.model_dump(mode="json"), indent=2))
        return
    table = Table(title="hardware")
    table.add_column("item")
    table.add_column("value")
    for k, v in profile.summary_rows():
        table.add_row(k, v)
    console.print(table)


def plan(
    model: str = typer.Option(..., "--model", "-m", help="model folder with config.json, or builtin:demo"),
    use_case: str = typer.Option("long_context", "--use-case", "-u", help=f"one of {', '.join(USE_CASES)}"),
    target_context: int | None = typer.Option(None, "--target-context", "-c", help="tokens; default per use case"),
    capacity: float | None = typer.Option(
        None, "--capacity", help="trainable parameters as a fraction of the base (0 < c <= 1); default per use case"
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="write the recipe here"),
    explain: bool = typer.Option(False, "--explain", help="show the reason for every value"),
    hardware_file: Path | None = typer.Option(
        None, "--hardware", help="plan for this hardware profile (YAML/JSON) instead of this machine"
    ),
    dataset_tokens: int | None = typer.Option(None, "--dataset-tokens", help="size of your data in tokens"),
    data: list[str] | None = typer.Option(
        None, "--data", help="training file(s) for data.train (repeatable); without it data.train is left empty "
        "and the recipe fails validation until you fill it in"),
    eval_data: list[str] | None = typer.Option(None, "--eval-data", help="held-out file(s) for data.eval (repeatable)"),
    base_length: int | None = typer.Option(
        None, "--base-length", help="context.base_length: the context the model is treated as trained to "
        "(default: its max_position_embeddings)"),
) -> None:
    """Recommend a recipe for a use case, this (or a given) machine and a model."""
    profile: HardwareProfile = load_hardware_profile(hardware_file) if hardware_file else detect_hardware(
        output.parent if output else Path(".")
    )
    rec = recommend(use_case, model, profile, target_context=target_context, capacity=capacity,
                    dataset_tokens=dataset_tokens, data=data, eval_data=eval_data, base_length=base_length)
    p = rec.plan
    budget = "unknown" if p.memory_budget_bytes is None else f"{p.memory_budget_bytes / GiB:.1f} GiB"
    console.print(
        f"[bold]{use_case}[/] on {profile.accelerator}: context {rec.base_length} -> {rec.target_length}, "
        f"LoRA r={p.options['rank']} ({p.trainable_params:,} trainable, {100 * p.capacity_used:.3f}% of "
        f"{p.base_params:,}), peak ~{p.memory.total / GiB:.2f} GiB of {budget}"
    )
    mem = Table(title="memory estimate (GiB)")
    for k in p.memory.breakdown_gb():
        mem.add_column(k, justify="right")
    mem.add_row(*[f"{v:.3f}" for v in p.memory.breakdown_gb().values()])
    console.print(mem)
    console.print(
        f"training step ~{p.memory.step_total / GiB:.2f} GiB; probes at {rec.target_length} tokens "
        f"~{p.memory.probe_total / GiB:.2f} GiB (working set {p.memory.probe / GiB:.3f} GiB, one row, chunked head); "
        f"merged export ~{p.memory.export_total / GiB:.2f} GiB (reload check in fp32)"
    )
    if explain:
        table = Table(title="why")
        table.add_column("field")
        table.add_column("value")
        table.add_column("reason")
        for field, value, reason in p.explain():
            table.add_row(field, value, reason)
        for a in rec.adjustments:
            table.add_row(a.field, repr(a.after), a.reason)
        console.print(table)
    for note in rec.notes:
        console.print(f"[yellow]note:[/] {note}")
    if output:
        written = write_recommendation(rec, output)
        if written is None:
            console.print(f"[yellow]recipe written to {output} without training data:[/] fill in data.train "
                          f"(or re-run with --data FILE), then `scaler-wizard validate {output}`")
        else:
            console.print(f"recipe written to {output} (validated); run it with `scaler-wizard run {output}`")
    elif rec.missing_data:
        console.print("[yellow]note:[/] no --data given: a written recipe would have an empty data.train")
