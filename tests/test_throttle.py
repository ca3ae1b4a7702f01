"""Cognitive Load Throttle: one test per rule, then a simulated burst of 1,000 alerts in 10 s."""

from __future__ import annotations

import json

import pytest

from scaler_wizard.alerts.throttle import (
    AlertRequest,
    BucketPolicy,
    CognitiveLoadThrottle,
    ThrottlePolicy,
    load_policy,
)
from scaler_wizard.errors import InputError


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def roomy(**overrides) -> ThrottlePolicy:
    """A policy whose buckets never run dry, to test one rule at a time."""
    big = BucketPolicy(capacity=1000, refill_per_s=100)
    fields = {"buckets": {"voice": big, "visual": big, "telegram": big}, "dedup_window_s": 0, "escalate_after": 0}
    fields.update(overrides)
    return ThrottlePolicy(**fields)


def outcomes(decision) -> dict[str, str]:
    return {c: d.outcome for c, d in decision.channels.items()}


def test_severity_decides_the_channels():
    th = CognitiveLoadThrottle(roomy(), clock=FakeClock())
    assert outcomes(th.request("safety", "critical", "stop", key="a")) == {
        "voice": "granted", "visual": "granted", "telegram": "granted"}
    th = CognitiveLoadThrottle(roomy(), clock=FakeClock())
    warn = th.request("safety", "warning", "ppl up", key="b")
    assert outcomes(warn) == {"voice": "denied", "visual": "granted", "telegram": "granted"}
    assert "does not use the voice channel" in warn.channels["voice"].reason
    assert outcomes(th.request("telemetry", "info", "stage 2", key="c")) == {
        "voice": "denied", "visual": "denied", "telegram": "granted"}


def test_key_defaults_to_source_and_message():
    assert AlertRequest(source="ui", severity="info", message="hello").key == "ui/hello"


def test_at_most_one_voice_alert_at_a_time():
    clock = FakeClock()
    th = CognitiveLoadThrottle(roomy(voice_duration_s=8), clock=clock)
    assert th.request("safety", "critical", "nan loss", key="a").granted("voice")
    clock.advance(3)
    second = th.request("safety", "critical", "oom", key="b")
    assert second.channels["voice"].outcome == "deferred"
    assert "another voice alert is playing" in second.channels["voice"].reason
    clock.advance(5.1)
    assert th.request("safety", "critical", "oom again", key="c").granted("voice")


def test_voice_preempts_non_critical_visual():
    clock = FakeClock()
    th = CognitiveLoadThrottle(roomy(voice_duration_s=8), clock=clock)
    th.request("safety", "critical", "stop", key="a")
    clock.advance(1)
    warn = th.request("safety", "warning", "slow", key="b")
    assert warn.channels["visual"].outcome == "deferred"
    assert "voice pre-empts visual" in warn.channels["visual"].reason
    assert warn.granted("telegram")
    # a critical banner is never hidden by speech
    assert th.request("safety", "critical", "second", key="c").granted("visual")
    clock.advance(8)
    assert th.request("safety", "warning", "slow", key="d").granted("visual")
    # the rule can be switched off
    th2 = CognitiveLoadThrottle(roomy(voice_preempts_visual=False), clock=FakeClock())
    th2.request("safety", "critical", "stop", key="a")
    assert th2.request("safety", "warning", "slow", key="b").granted("visual")


def test_token_bucket_per_channel():
    clock = FakeClock()
    policy = roomy(buckets={"voice": BucketPolicy(capacity=1, refill_per_s=0),
                            "visual": BucketPolicy(capacity=1, refill_per_s=0),
                            "telegram": BucketPolicy(capacity=2, refill_per_s=1.0)})
    th = CognitiveLoadThrottle(policy, clock=clock)
    got = [th.request("t", "info", f"m{i}", key=f"k{i}") for i in range(3)]
    assert [d.channels["telegram"].outcome for d in got] == ["granted", "granted", "deferred"]
    assert "rate limit of the telegram channel (next token in 1.0 s)" in got[2].channels["telegram"].reason
    clock.advance(0.5)
    assert not th.request("t", "info", "m3", key="k3").granted("telegram")
    clock.advance(0.6)
    assert th.request("t", "info", "m4", key="k4").granted("telegram")
    # the visual bucket is separate: a warning still gets its banner
    assert th.request("t", "warning", "w", key="w").granted("visual")


def test_dedup_window_folds_same_key_into_counter():
    clock = FakeClock()
    th = CognitiveLoadThrottle(roomy(dedup_window_s=30), clock=clock)
    first = th.request("telemetry", "info", "slow step", key="slow")
    assert first.granted("telegram") and first.repeats == 0
    folded = []
    for _ in range(4):
        clock.advance(5)
        folded.append(th.request("telemetry", "info", "slow step", key="slow"))
    assert all(d.channels["telegram"].outcome == "deferred" for d in folded)
    assert "folded, 4 so far" in folded[-1].channels["telegram"].reason
    # another key is not a duplicate
    assert th.request("telemetry", "info", "other", key="other").granted("telegram")
    clock.advance(11)  # 31 s after the window opened
    after = th.request("telemetry", "info", "slow step", key="slow")
    assert after.granted("telegram") and after.repeats == 4


def test_dedup_zero_disables_folding():
    th = CognitiveLoadThrottle(roomy(dedup_window_s=0), clock=FakeClock())
    assert all(th.request("t", "info", "x", key="same").granted("telegram") for _ in range(5))


def test_repeated_warnings_escalate_to_critical():
    clock = FakeClock()
    th = CognitiveLoadThrottle(roomy(escalate_after=3, escalate_window_s=60, dedup_window_s=30), clock=clock)
    d1 = th.request("safety", "warning", "grad norm high", key="gn")
    clock.advance(10)
    d2 = th.request("safety", "warning", "grad norm high", key="gn")
    clock.advance(10)
    d3 = th.request("safety", "warning", "grad norm high", key="gn")
    assert (d1.effective_severity, d2.effective_severity) == ("warning", "warning")
    assert d2.channels["visual"].outcome == "deferred"  # folded
    assert d3.escalated and d3.effective_severity == "critical"
    assert outcomes(d3) == {"voice": "granted", "visual": "granted", "telegram": "granted"}, "escalation skips dedup"
    assert d3.as_record()["severity"] == "warning" and d3.as_record()["effective_severity"] == "critical"
    # the key stays critical for the escalation window, but folds like any duplicate
    clock.advance(10)
    d4 = th.request("safety", "warning", "grad norm high", key="gn")
    assert d4.escalated and d4.effective_severity == "critical" and d4.channels["voice"].outcome == "deferred"
    # afterwards the count restarts; warnings spread wider than the window never escalate
    clock.advance(60)
    assert not th.request("safety", "warning", "grad norm high", key="gn").escalated
    clock.advance(100)
    assert not th.request("safety", "warning", "grad norm high", key="gn").escalated
    clock.advance(100)
    assert not th.request("safety", "warning", "grad norm high", key="gn").escalated


def test_quiet_and_mute_modes():
    th = CognitiveLoadThrottle(roomy(mode="quiet"), clock=FakeClock())
    d = th.request("safety", "critical", "stop", key="a")
    assert outcomes(d) == {"voice": "deferred", "visual": "granted", "telegram": "granted"}
    assert "quiet mode" in d.channels["voice"].reason
    th.set_mode("mute")
    d = th.request("safety", "critical", "stop", key="b")
    assert outcomes(d) == {"voice": "deferred", "visual": "deferred", "telegram": "granted"}
    th.set_mode("normal")
    assert th.request("safety", "critical", "stop", key="c").granted("voice")
    loud = CognitiveLoadThrottle(roomy(mode="mute", critical_breaks_mute=True), clock=FakeClock())
    assert loud.request("safety", "critical", "stop", key="a").granted("voice")
    assert loud.request("safety", "warning", "w", key="b").channels["visual"].outcome == "deferred"


def test_periodic_digest_and_log(tmp_path):
    clock = FakeClock()
    log = tmp_path / "alerts.jsonl"
    policy = roomy(dedup_window_s=300, digest_interval_s=60)
    th = CognitiveLoadThrottle(policy, log_path=log, clock=clock)
    for _ in range(5):
        th.request("telemetry", "warning", "throughput low", key="tp")
        clock.advance(1)
    assert th.tick() is None, "not due yet"
    clock.advance(60)
    # the next request emits the due digest before its own decision
    th.request("telemetry", "info", "hello", key="hi")
    assert len(th.digests) == 1
    digest = th.digests[0]
    assert digest["suppressed_alerts"] == 4
    assert digest["keys"][0]["key"] == "tp" and digest["keys"][0]["count"] == 4
    assert digest["keys"][0]["reasons"] == {"duplicate": 4}
    assert digest["by_channel"] == {"visual": 4, "telegram": 4}
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["type"] for r in records] == ["decision"] * 5 + ["digest", "decision"]
    assert records[1]["channels"]["visual"]["outcome"] == "deferred"
    assert th.flush() is None, "nothing pending"


def test_policy_validation_names_the_field():
    with pytest.raises(InputError, match=r"alerts\.buckets\.voice\.capacity"):
        load_policy({"buckets": {"voice": {"capacity": 0, "refill_per_s": 1},
                                 "visual": {"capacity": 1, "refill_per_s": 1},
                                 "telegram": {"capacity": 1, "refill_per_s": 1}}})
    with pytest.raises(InputError, match=r"alerts\.routes.*missing severities \['info'\]"):
        load_policy({"routes": {"warning": ["visual"], "critical": ["voice"]}})
    with pytest.raises(InputError, match=r"alerts\.volume"):
        load_policy({"volume": 11})
    assert load_policy(None) == ThrottlePolicy()


def burst(th: CognitiveLoadThrottle, clock: FakeClock, n: int = 1000, seconds: float = 10.0):
    """n alerts evenly over `seconds`: 10% critical (3 keys), 30% warning (5 keys), 60% info (20 keys)."""
    decisions, seen = [], {"critical": 0, "warning": 0, "info": 0}
    for i in range(n):
        r = i % 10
        sev = "critical" if r == 0 else ("warning" if r <= 3 else "info")
        prefix, n_keys = {"critical": ("crit", 3), "warning": ("warn", 5), "info": ("info", 20)}[sev]
        key = f"{prefix}-{seen[sev] % n_keys}"
        seen[sev] += 1
        decisions.append(th.request("safety" if sev != "info" else "telemetry", sev, f"{key} message {i}", key=key))
        clock.advance(seconds / n)
    return decisions


def test_burst_of_1000_alerts_in_10_seconds(tmp_path):
    clock = FakeClock()
    log = tmp_path / "alerts.jsonl"
    th = CognitiveLoadThrottle(ThrottlePolicy(), log_path=log, clock=clock)
    decisions = burst(th, clock)
    digest = th.flush()

    granted = {c: sum(d.granted(c) for d in decisions) for c in ("voice", "visual", "telegram")}
    deferred = {c: sum(d.channels[c].outcome == "deferred" for d in decisions) for c in granted}
    routed = {c: sum(d.channels[c].outcome != "denied" for d in decisions) for c in granted}
    # default buckets: voice 1 + 10 s / 30 s, visual 3 + 10 s / 10 s, telegram 10 + 10 s * 1/s
    assert granted["voice"] == 1
    assert 1 <= granted["visual"] <= 4
    assert 1 <= granted["telegram"] <= 20
    # nothing is silently lost: every routed channel is granted or deferred, every deferral is in the digest
    assert all(granted[c] + deferred[c] == routed[c] for c in granted)
    held = sum(any(cd.outcome == "deferred" for cd in d.channels.values()) for d in decisions)
    assert digest["suppressed_alerts"] == held == sum(k["count"] for k in digest["keys"])
    assert digest["by_channel"] == {c: n for c, n in deferred.items() if n}
    assert {k["key"] for k in digest["keys"]} == {f"crit-{i}" for i in range(3)} | {
        f"warn-{i}" for i in range(5)} | {f"info-{i}" for i in range(20)}
    assert digest["keys"][0]["severity"] == "critical"
    assert sum(d.escalated and d.request.severity == "warning" and d.channels["voice"].outcome == "granted"
               for d in decisions) <= 1
    assert sum(d.as_record()["escalated"] for d in decisions) >= 5, "each warning key escalates"
    lines = log.read_text().splitlines()
    assert len(lines) == 1001 and json.loads(lines[-1])["type"] == "digest"

    figures = {"alerts": 1000, "seconds": 10, "granted": granted, "deferred": deferred,
               "escalated_keys": len({d.request.key for d in decisions if d.escalated}),
               "alerts_raised_to_critical": sum(d.escalated for d in decisions),
               "digest": {k: digest[k] for k in ("suppressed_alerts", "by_channel")} | {
                   "top_keys": [{k: e[k] for k in ("key", "count", "severity", "reasons")} for e in digest["keys"][:5]]}}
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "throttle_burst.json").write_text(json.dumps(figures, indent=2))
    print("\nTHROTTLE BURST", json.dumps(figures))
