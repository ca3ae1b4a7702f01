"""The statistics every benchmark shares: A/B runs interleaved, warm-up excluded, repeated, and
a ratio reported as a median with a 95% bootstrap interval -- never a single run.

This machine is noisy (2 shared cores): the same configuration's throughput moves by 30%
between runs. A target is therefore judged on the whole interval:

* ``met``          -- the whole 95% interval clears the target;
* ``missed``       -- the whole interval is on the wrong side;
* ``not resolved`` -- the interval straddles the target (more repeats, or a quieter machine).

Usage::

    from harness import interleaved, ratio_summary
    samples = interleaved({"baseline": run_baseline, "ours": run_ours}, repeats=5, warmup=1)
    summary = ratio_summary(samples["ours"], samples["baseline"], target=1.3, higher_is_better=True)

``machine_state()`` records thread count and load so a figure can be read in context.
"""

from __future__ import annotations

import os
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MET, MISSED, NOT_RESOLVED = "met", "missed", "not resolved"


def interleaved(runs: Mapping[str, Callable[[], float]], *, repeats: int = 5, warmup: int = 1,
                seed: int = 0) -> dict[str, list[float]]:
    """Call every side once per round (ABAB..., the order shuffled each round so neither side
    always runs second on a warm cache), ``warmup`` rounds discarded, ``repeats`` kept."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    rng = random.Random(seed)
    names = list(runs)
    out: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(warmup + repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            value = float(runs[name]())
            if round_index >= warmup:
                out[name].append(value)
    return out


def bootstrap_ratio(numerator: Sequence[float], denominator: Sequence[float], *, resamples: int = 2000,
                    confidence: float = 0.95, seed: int = 0, paired: bool = True) -> tuple[float, float, float]:
    """(median ratio, low, high): the percentile bootstrap of median(num)/median(den). ``paired``
    resamples rounds together (the i-th values ran side by side), else each side on its own."""
    if not numerator or not denominator:
        raise ValueError("both sides need at least one value")
    if paired and len(numerator) != len(denominator):
        raise ValueError("paired samples need equal lengths")
    rng = random.Random(seed)
    point = statistics.median(numerator) / statistics.median(denominator)
    stats = []
    n, d = len(numerator), len(denominator)
    for _ in range(resamples):
        if paired:
            idx = [rng.randrange(n) for _ in range(n)]
            num = [numerator[i] for i in idx]
            den = [denominator[i] for i in idx]
        else:
            num = [numerator[rng.randrange(n)] for _ in range(n)]
            den = [denominator[rng.randrange(d)] for _ in range(d)]
        stats.append(statistics.median(num) / statistics.median(den))
    stats.sort()
    tail = (1 - confidence) / 2
    low = stats[int(tail * (resamples - 1))]
    high = stats[int((1 - tail) * (resamples - 1))]
    return point, low, high


def verdict(low: float, high: float, target: float, *, higher_is_better: bool) -> str:
    """met / missed / not resolved, judged on the whole interval."""
    if higher_is_better:
        return MET if low >= target else MISSED if high < target else NOT_RESOLVED
    return MET if high <= target else MISSED if low > target else NOT_RESOLVED


def ratio_summary(numerator: Sequence[float], denominator: Sequence[float], *, target: float | None = None,
                  higher_is_better: bool = True, paired: bool = True, seed: int = 0) -> dict[str, Any]:
    """The figure a benchmark reports: median ratio, its 95% interval, the samples, the verdict."""
    point, low, high = bootstrap_ratio(numerator, denominator, paired=paired, seed=seed)
    out: dict[str, Any] = {
        "ratio": round(point, 4), "ci95": [round(low, 4), round(high, 4)], "repeats": len(numerator),
        "numerator": [round(x, 6) for x in numerator], "denominator": [round(x, 6) for x in denominator],
    }
    if target is not None:
        out["target"] = target
        out["verdict"] = verdict(low, high, target, higher_is_better=higher_is_better)
    return out


def fmt(summary: Mapping[str, Any]) -> str:
    """``1.23 [1.10, 1.31]`` -- how BENCHMARKS.md tables show a ratio."""
    low, high = summary["ci95"]
    return f"{summary['ratio']:.3g} [{low:.3g}, {high:.3g}]"


def machine_state() -> dict[str, Any]:
    """Threads and load at the time of the measurement (read beside every figure)."""
    import platform

    state: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                             "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        state["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import torch

        state["torch_threads"] = torch.get_num_threads()
        state["torch"] = torch.__version__
    except ImportError:
        pass
    return state
