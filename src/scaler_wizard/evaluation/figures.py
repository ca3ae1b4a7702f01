"""From probe results to figures: one metric-name table, the probes a stage runs, the gate.

Every place that turns a :class:`ProbeResult` into a named number (metrics.jsonl, the safety
envelope, the summary, the gate) goes through :func:`probe_figures`, so a metric has one name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..context.schedule import Stage
from ..recipe import Recipe
from .lm_eval_probe import LM_EVAL_PROBE
from .probes import (
    BUILTIN_PROBES,
    PasskeyProbe,
    PerplexityProbe,
    ProbeContext,
    ProbeResult,
    ShortContextProbe,
    run_probe,
)

# (probe, metric key) -> the metric's name in metrics.jsonl and the envelope (suffixed "@<length>")
METRIC_NAMES: dict[tuple[str, str], str] = {
    ("perplexity", "perplexity"): "eval/perplexity",
    ("perplexity", "bits_per_byte"): "eval/bits_per_byte",
    ("perplexity", "perplexity_change_pct"): "eval/perplexity_change_pct",
    ("passkey", "accuracy"): "probe/passkey",
    ("passkey", "accuracy_heldout_template"): "probe/passkey_heldout_template",
    ("short_context", "regression_pct"): "eval/short_context_regression_pct",
}
# (probe, metric key) -> the summary's short name ("perplexity@1024")
SUMMARY_NAMES: dict[tuple[str, str], str] = {
    ("perplexity", "perplexity"): "perplexity",
    ("perplexity", "bits_per_byte"): "bits_per_byte",
    ("passkey", "accuracy"): "passkey",
    ("passkey", "accuracy_heldout_template"): "passkey_heldout_template",
}


def probe_figures(result: ProbeResult) -> Iterator[tuple[str, float]]:
    """(metric name without the length suffix, value) of one successful probe result; custom
    probes contribute every numeric metric as ``probe/<name>/<key>``, lm-eval tasks
    (``evaluation.lm_eval``) theirs as ``lm_eval/<task>/<metric>``."""
    if result.error:
        return
    for key, value in result.metrics.items():
        name = METRIC_NAMES.get((result.probe, key))
        if result.probe == LM_EVAL_PROBE:
            name = f"{LM_EVAL_PROBE}/{key}"
        elif name is None and result.probe not in BUILTIN_PROBES and isinstance(value, (int, float)):
            name = f"probe/{result.probe}/{key}"
        if name:
            yield name, value


def eval_metrics(results: list[ProbeResult]) -> dict[str, float]:
    """``{"eval/perplexity@512": ..., "probe/passkey@512": ...}``: what the envelope observes."""
    return {f"{name}@{r.length}": value for r in results for name, value in probe_figures(r)}


def flatten_results(results: list[ProbeResult]) -> dict[str, float]:
    """``{"perplexity@L", "bits_per_byte@L", "passkey@L", "lm_eval/<task>/<metric>@L", ...}`` for the
    summary (errors skipped)."""
    out: dict[str, float] = {}
    for r in results:
        if r.error:
            continue
        for key, value in r.metrics.items():
            short = f"{LM_EVAL_PROBE}/{key}" if r.probe == LM_EVAL_PROBE else SUMMARY_NAMES.get((r.probe, key))
            if short:
                out[f"{short}@{r.length}"] = value
    return out


def log_probe_results(writer: Any, step: int, results: list[ProbeResult], stage: int | None, prefix: str) -> None:
    for r in results:
        if r.error:
            writer.log(step, f"{prefix}probe_error/{r.probe}@{r.length}", float("nan"), stage=stage, error=r.error)
            continue
        for name, value in probe_figures(r):
            writer.log(step, f"{prefix}{name}@{r.length}", value, stage=stage)


def probe_at(model: Any, length: int, ctx: ProbeContext, recipe: Recipe, *, with_short: bool) -> list[ProbeResult]:
    """The recipe's built-in probes at one length (short-context regression only after training)."""
    ev = recipe.evaluation
    results = []
    if ev.perplexity.enabled:
        results.append(run_probe(PerplexityProbe(ev.perplexity.windows), model, length, ctx))
    if ev.passkey.enabled:
        probe = PasskeyProbe(ev.passkey.trials, ev.passkey.depths, ev.passkey.seed, ev.passkey.heldout_template)
        results.append(run_probe(probe, model, length, ctx))
    if with_short and ev.short_context.enabled:
        results.append(run_probe(ShortContextProbe(ev.perplexity.windows), model, length, ctx))
    return results


def gate(stage: Stage, results: list[ProbeResult], base_ppl: float | None) -> list[str]:
    """The checks of a stage that failed (empty list: the gate passes). A probe error fails its
    check: a gate never passes on a figure it could not measure."""
    by_probe = {r.probe: r for r in results}
    failed = []
    for check in stage.checks:
        r = by_probe.get(check.probe)
        if r is None:
            continue  # probe disabled in the recipe
        if r.error:
            failed.append(f"{check.description}: probe error ({r.error})")
            continue
        if check.probe == "passkey":
            value = r.metrics[check.metric or "accuracy"]
        elif check.probe == "perplexity":
            value = r.metrics["perplexity"] / base_ppl if base_ppl else float("inf")
        else:
            value = r.metrics["regression_pct"]
        ok = value >= check.threshold if check.comparison == ">=" else value <= check.threshold
        if not ok:
            failed.append(f"{check.description} = {value:.3f} (needs {check.comparison} {check.threshold})")
    return failed
