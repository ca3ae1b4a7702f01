"""Context Scheduler: from (base, target, optional explicit schedule) to gated stages.

Default schedule doubles the length from the base until the target (PI and YaRN both extend
in one jump; progressive doubling is what LongLoRA-style and LongRoPE-style recipes do to keep
every stage's fine-tuning short and its probes meaningful).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import PlanError


@dataclass(frozen=True)
class ProbeCheck:
    """A probe to run at the end of a stage and its pass condition."""

    probe: str
    length: int
    threshold: float
    comparison: str  # ">=" or "<="
    description: str
    metric: str = ""  # the probe metric compared; "" = the probe's headline figure


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    length: int
    method: str
    method_params: dict[str, Any]
    steps: int
    checks: tuple[ProbeCheck, ...] = field(default_factory=tuple)


def plan_lengths(base: int, target: int, schedule: list[int] | None = None) -> list[int]:
    """Stage lengths, validated: strictly increasing, within (base, target], ending at target."""
    if target <= base:
        raise PlanError(
            f"context.target_length ({target}) must be larger than the base context ({base}).",
            hint="Raise target_length or lower context.base_length.",
        )
    if schedule is None:
        lengths, cur = [], base
        while cur < target:
            cur = min(cur * 2, target)
            lengths.append(cur)
        return lengths
    if not schedule:
        raise PlanError("context.schedule is empty.", hint="Omit it for doubling stages, or list stage lengths.")
    problems = []
    for i, (a, b) in enumerate(zip(schedule, schedule[1:])):
        if b <= a:
            problems.append(f"stage {i + 2} ({b}) is not longer than stage {i + 1} ({a})")
    if schedule[0] <= base:
        problems.append(f"first stage ({schedule[0]}) must exceed the base context ({base})")
    if schedule[-1] != target:
        problems.append(f"last stage ({schedule[-1]}) must equal context.target_length ({target})")
    if any(s > target for s in schedule):
        problems.append(f"stages beyond the target ({target}) are not allowed")
    if problems:
        raise PlanError("context.schedule is invalid: " + "; ".join(problems) + ".")
    return list(schedule)


def build_stages(
    base: int,
    target: int,
    method: str,
    method_params: dict[str, Any],
    steps: int | list[int],
    *,
    schedule: list[int] | None = None,
    passkey_min: float | None = None,
    passkey_min_depth: float | None = None,
    ppl_max_ratio: float | None = None,
    short_max_regression_pct: float | None = None,
) -> list[Stage]:
    lengths = plan_lengths(base, target, schedule)
    if isinstance(steps, list):
        if len(steps) != len(lengths):
            raise PlanError(
                f"training.steps_per_stage lists {len(steps)} budgets for {len(lengths)} stages {lengths}.",
                hint="Give one number per stage, or a single number for all.",
            )
        budgets = steps
    else:
        budgets = [steps] * len(lengths)
    stages = []
    for i, (length, budget) in enumerate(zip(lengths, budgets), start=1):
        checks = []
        if passkey_min is not None:
            checks.append(ProbeCheck("passkey", length, passkey_min, ">=", f"passkey accuracy @{length}"))
        if passkey_min_depth is not None:
            checks.append(ProbeCheck("passkey", length, passkey_min_depth, ">=",
                                     f"passkey worst-depth accuracy @{length}", metric="accuracy_worst_depth"))
        if ppl_max_ratio is not None:
            checks.append(
                ProbeCheck("perplexity", length, ppl_max_ratio, "<=", f"ppl @{length} / base ppl @{base}")
            )
        if short_max_regression_pct is not None:
            checks.append(
                ProbeCheck("short_context", base, short_max_regression_pct, "<=", f"ppl change @{base} vs base (%)")
            )
        stages.append(Stage(i, length, method, dict(method_params), budget, tuple(checks)))
    return stages
