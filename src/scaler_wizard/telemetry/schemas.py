"""The data contracts as shipped JSON Schemas (``scaler_wizard/schemas/*.schema.json``), and
helpers that validate documents and whole run directories against them.

Each schema carries a top-level ``schema_version`` (an annotation JSON Schema ignores). The
schemas allow unknown keys: files are read forward-compatibly, so a newer writer's extra
fields never make an older reader reject a run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from ..errors import InputError
from .reader import read_jsonl

SCHEMAS = {
    "metric_event": "metric_event.schema.json",
    "telemetry_envelope": "telemetry_envelope.schema.json",
    "telegram": "telegram.schema.json",
}


class TelemetrySchemaError(InputError):
    """A telemetry document does not match its schema; carries every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(
            f"{source} does not match its schema ({len(problems)} problem(s)): {'; '.join(problems[:20])}"
            + (" ..." if len(problems) > 20 else "") + ".",
            hint="The file was written by a different version or edited by hand; see scaler_wizard/schemas/.",
        )


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A shipped schema by short name (``metric_event``, ``telemetry_envelope``, ``telegram``)."""
    if name not in SCHEMAS:
        raise InputError(f"Unknown schema {name!r}.", hint=f"Use one of: {', '.join(sorted(SCHEMAS))}.")
    text = resources.files("scaler_wizard").joinpath("schemas", SCHEMAS[name]).read_text(encoding="utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return schema


def schema_version(name: str) -> int:
    return int(load_schema(name)["schema_version"])


@cache
def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(load_schema(name))


def schema_problems(name: str, document: Any) -> list[str]:
    """Every way ``document`` breaks schema ``name``, each as ``<json path>: <message>``."""
    errors = sorted(_validator(name).iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{e.json_path}: {e.message}" for e in errors]


def validate(name: str, document: Any, *, source: str = "document") -> None:
    """Raise :class:`TelemetrySchemaError` listing all problems, or return silently."""
    problems = schema_problems(name, document)
    if problems:
        raise TelemetrySchemaError(source, problems)


def validate_events(events: Iterable[dict[str, Any]], *, source: str = "metrics") -> int:
    """Validate MetricEvents; returns how many were checked."""
    problems: list[str] = []
    count = 0
    for count, event in enumerate(events, start=1):
        problems.extend(f"event {count} {p}" for p in schema_problems("metric_event", event))
    if problems:
        raise TelemetrySchemaError(source, problems)
    return count


def validate_run_dir(run_dir: Path) -> dict[str, int]:
    """Check a run directory's envelope.json, metrics.jsonl, telegram.json and telegrams.jsonl
    (those present; the envelope is required). Returns counts of what was checked."""
    run_dir = Path(run_dir)
    envelope_path = run_dir / "envelope.json"
    if not envelope_path.is_file():
        raise InputError(f"{envelope_path} is missing.", hint="Is this a Scaler Wizard run directory?")
    envelope = json.loads(envelope_path.read_text(encoding="utf-8"))
    validate("telemetry_envelope", envelope, source=str(envelope_path))
    counts = {"envelope": 1, "metric_events": 0, "telegrams": 0}
    metrics_path = run_dir / envelope["metrics_path"]
    if metrics_path.exists():
        result = read_jsonl(metrics_path)
        if result.corrupt:
            raise TelemetrySchemaError(str(metrics_path), [result.describe_problems()])
        counts["metric_events"] = validate_events(result.records, source=str(metrics_path))
    telegram_path = run_dir / envelope["telegram_path"]
    if telegram_path.exists():
        validate("telegram", json.loads(telegram_path.read_text(encoding="utf-8")), source=str(telegram_path))
        counts["telegrams"] += 1
    history = run_dir / "telegrams.jsonl"
    if history.exists():
        result = read_jsonl(history)
        problems = [result.describe_problems()] if result.corrupt else []
        for i, telegram in enumerate(result.records, start=1):
            problems.extend(f"telegram {i} {p}" for p in schema_problems("telegram", telegram))
        if problems:
            raise TelemetrySchemaError(str(history), problems)
        counts["telegrams"] += len(result.records)
    return counts


__all__ = [
    "SCHEMAS",
    "TelemetrySchemaError",
    "load_schema",
    "schema_problems",
    "schema_version",
    "validate",
    "validate_events",
    "validate_run_dir",
]
