"""`scaler-wizard distill ...`: tools for knowledge preservation.

``distill cache`` precomputes an offline teacher: the teacher's top-k log-probabilities over
consecutive ``--length``-token rows of the data, written as safetensors shards with a manifest
(see :mod:`scaler_wizard.distill.offline_cache`). Train from it with
``distillation.teacher: offline`` and no teacher in memory. Errors propagate as
ScalerWizardError; the main CLI turns them into messages and exit codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

distill_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Knowledge preservation: offline teacher caches.")
console = Console()


@distill_app.callback()
def _group() -> None:
    """Knowledge preservation: offline teacher caches."""
    # a callback keeps `distill` a command group even while it has a single command


@distill_app.command("cache")
def cache(
    model: Annotated[Path, typer.Argument(help="teacher model folder (Hugging Face format, safetensors)")],
    data: Annotated[list[Path], typer.Argument(help="data files (.jsonl/.json/.txt/.parquet/.csv) or saved datasets folders")],
    output: Annotated[Path, typer.Option("--output", "-o", help="cache folder to create")],
    length: Annotated[int, typer.Option(help="tokens per row: use the base context length (replay rows)")] = 256,
    k: Annotated[int, typer.Option(help="top-k log-probabilities kept per position")] = 32,
    temperature: Annotated[float, typer.Option(help="temperature of the stored log-probabilities")] = 1.0,
    text_field: Annotated[str, typer.Option(help="text column of .jsonl/.parquet/.csv data")] = "text",
    max_rows: Annotated[int | None, typer.Option(help="cache at most this many rows")] = None,
    batch_size: Annotated[int, typer.Option(help="rows per teacher forward pass")] = 4,
    shard_rows: Annotated[int, typer.Option(help="rows per safetensors shard")] = 256,
    dtype: Annotated[str, typer.Option(help="teacher weights dtype (float32, bfloat16, float16)")] = "float32",
    logprob_dtype: Annotated[str, typer.Option(help="stored log-prob dtype (float32 or float16)")] = "float32",
    chunk_size: Annotated[int, typer.Option(help="positions per logits chunk (memory)")] = 512,
    teacher_id: Annotated[str | None, typer.Option(help="teacher identity for the manifest (default: model path)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing cache folder")] = False,
) -> None:
    """Precompute the teacher's top-k log-probabilities over the data once."""
    from ..data import load_texts, token_stream
    from .offline_cache import build_cache, stream_windows
    from .teacher import load_teacher_model

    teacher, tokenizer = load_teacher_model(model, dtype=dtype)
    rows = stream_windows(token_stream(tokenizer, load_texts(list(data), text_field)), length, max_rows)
    with Progress(TextColumn("caching teacher top-k"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("rows", total=len(rows))
        manifest = build_cache(
            teacher, rows, output, k=k, temperature=temperature, teacher_id=teacher_id or str(model.resolve()),
            batch_size=batch_size, rows_per_shard=shard_rows, chunk_size=chunk_size, logprob_dtype=logprob_dtype,
            overwrite=overwrite, progress=lambda n: progress.advance(task, n),
        )
    console.print(f"wrote {manifest['n_rows']} rows x {manifest['length']} tokens, k={manifest['k']}, "
                  f"{len(manifest['shards'])} shard(s) to {output}")
