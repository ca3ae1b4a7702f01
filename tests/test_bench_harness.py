"""The benchmark harness's statistics: interleaving, the bootstrap interval of a ratio, and the
three verdicts judged on the whole interval."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from harness import MET, MISSED, NOT_RESOLVED, interleaved, ratio_summary, verdict


def test_interleaved_discards_warmup_and_alternates():
    calls = []
    runs = {"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}
    out = interleaved(runs, repeats=5, warmup=1)
    assert out == {"a": [1.0] * 5, "b": [2.0] * 5}
    rounds = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b"] for r in rounds)  # each round runs both once


def test_clear_difference_is_met_and_noise_is_not_resolved():
    fast = [13.0, 12.6, 13.2, 12.9, 13.1, 12.8]
    slow = [10.0, 10.2, 9.9, 10.1, 9.8, 10.0]
    s = ratio_summary(fast, slow, target=1.2)
    assert s["verdict"] == MET and s["ci95"][0] >= 1.2 and s["ci95"][0] <= s["ratio"] <= s["ci95"][1]
    noisy = [10.0, 14.0, 9.0, 13.0, 10.5, 12.0]
    base = [11.0, 10.0, 12.5, 9.5, 11.5, 10.0]
    assert ratio_summary(noisy, base, target=1.05)["verdict"] == NOT_RESOLVED
    assert ratio_summary(slow, fast, target=1.0)["verdict"] == MISSED


@pytest.mark.parametrize("low,high,target,hib,expected", [
    (1.1, 1.3, 1.0, True, MET), (0.8, 0.9, 1.0, True, MISSED), (0.9, 1.1, 1.0, True, NOT_RESOLVED),
    (0.2, 0.3, 0.25, False, NOT_RESOLVED), (0.1, 0.2, 0.25, False, MET), (0.3, 0.4, 0.25, False, MISSED),
])
def test_verdict_uses_the_whole_interval(low, high, target, hib, expected):
    assert verdict(low, high, target, higher_is_better=hib) == expected
