"""Cognitive Load Throttle (spec module 7): alert requests -> permission per channel.

Safety, telemetry and UI code *request* an alert; the throttle decides, for each channel, whether
it may interrupt the operator now. Channels are ordered by how much attention they take:

    voice     spoken by the cockpit (speech synthesis) - the most intrusive, one at a time
    visual    the cockpit's alert banner
    telegram  the passive feed (a line in the cockpit's telegram list)

Each channel gets one of three outcomes, always with the reason:

    granted   deliver now
    deferred  not now; the alert is held for the next digest (rate limit, duplicate, voice busy,
              quiet/mute) - so nothing is silently lost
    denied    this channel is not used for this severity (routing, not suppression)

Rules, applied in this order (every number is a field of :class:`ThrottlePolicy`):

1. *Escalation* - the ``escalate_after``-th warning with the same key within ``escalate_window_s``
   becomes critical (a warning that keeps coming back is no longer a warning) and is exempt from
   dedup; the key's later warnings stay critical for ``escalate_window_s`` (and fold as usual).
2. *Routing* - the (effective) severity picks the channels: critical -> voice + visual + telegram,
   warning -> visual + telegram, info -> telegram. Other channels are denied.
3. *Dedup* - the same key within ``dedup_window_s`` of the first alert of its window is folded into
   a counter (all channels deferred); the next alert of that key outside the window reports how
   many were folded (``repeats``).
4. *Mode* - ``quiet`` defers voice; ``mute`` defers voice and visual (the feed still records);
   ``critical_breaks_mute`` lets critical alerts through anyway.
5. *One voice at a time* - voice is busy for ``voice_duration_s`` after a grant; voice requests
   meanwhile are deferred.
6. *Voice pre-empts visual* - while a voice alert is being spoken, non-critical visual alerts are
   deferred, so the operator is not asked to listen and read two different things at once
   (multiple-resource theory: two demands on attention at once degrade both; Wickens 2008,
   "Multiple resources and mental workload", Human Factors 50(3)).
7. *Rate limit* - one token bucket per channel (capacity = burst, refill per second); an empty
   bucket defers.

Deferred alerts are summarised in a *digest* every ``digest_interval_s`` (and on :meth:`flush`):
per key, how many, the highest severity, the last message and why they were held. Decisions and
digests are appended to ``alerts.jsonl`` (one JSON object per line, ``"type": "decision"`` or
``"digest"``), which the cockpit streams.

Pure module: no web or torch imports. Time comes from an injectable ``clock`` (seconds since the
epoch), so tests simulate bursts without sleeping.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InputError

Severity = Literal["info", "warning", "critical"]
Channel = Literal["voice", "visual", "telegram"]
Outcome = Literal["granted", "deferred", "denied"]
Mode = Literal["normal", "quiet", "mute"]

CHANNELS: tuple[Channel, ...] = ("voice", "visual", "telegram")
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
ALERTS_SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlertRequest(_Strict):
    """What a module asks for. ``key`` identifies "the same alert" for dedup and escalation
    (e.g. ``safety/loss_spike``); it defaults to ``source/message``."""

    source: str = Field(..., min_length=1, description="who asks: safety, telemetry, ui, ...")
    severity: Severity
    message: str = Field(..., min_length=1)
    key: str = ""

    @model_validator(mode="after")
    def _default_key(self) -> AlertRequest:
        if not self.key:
            self.key = f"{self.source}/{self.message}"
        return self


class BucketPolicy(_Strict):
    """Token bucket: up to ``capacity`` grants in a burst, then ``refill_per_s`` per second."""

    capacity: float = Field(..., gt=0, description="grants in a burst")
    refill_per_s: float = Field(..., ge=0, description="grants regained per second")


def _default_routes() -> dict[str, list[str]]:
    return {"critical": ["voice", "visual", "telegram"], "warning": ["visual", "telegram"], "info": ["telegram"]}


def _default_buckets() -> dict[str, BucketPolicy]:
    return {
        "voice": BucketPolicy(capacity=1, refill_per_s=1 / 30),  # at most ~2 spoken alerts a minute
        "visual": BucketPolicy(capacity=3, refill_per_s=1 / 10),
        "telegram": BucketPolicy(capacity=10, refill_per_s=1.0),
    }


class ThrottlePolicy(_Strict):
    """The throttle's configuration (meant for a recipe section ``alerts:``); defaults are chosen
    so that a burst costs the operator at most a few interruptions and a digest."""

    routes: dict[Severity, list[Channel]] = Field(default_factory=_default_routes,
                                                  description="channels used per severity")
    buckets: dict[Channel, BucketPolicy] = Field(default_factory=_default_buckets)
    voice_duration_s: float = Field(8.0, gt=0, description="how long one spoken alert occupies the voice channel")
    voice_preempts_visual: bool = Field(True, description="while a voice alert plays, non-critical visual alerts wait")
    dedup_window_s: float = Field(60.0, ge=0, description="same key within this window is folded (0: off)")
    escalate_after: int = Field(3, ge=0, description="warnings with one key that make it critical (0: never)")
    escalate_window_s: float = Field(300.0, gt=0, description="window of escalate_after; an escalated key stays "
                                     "critical this long")
    digest_interval_s: float = Field(60.0, gt=0, description="seconds between digests of the deferred alerts")
    mode: Mode = Field("normal", description="quiet defers voice; mute defers voice and visual (the feed still records)")
    critical_breaks_mute: bool = Field(False, description="critical alerts pass in quiet and mute modes")

    @field_validator("routes")
    @classmethod
    def _all_severities(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        missing = [s for s in SEVERITY_RANK if s not in v]
        if missing:
            raise ValueError(f"missing severities {missing}; give channels for info, warning and critical")
        return v

    @field_validator("buckets")
    @classmethod
    def _all_channels(cls, v: dict[str, BucketPolicy]) -> dict[str, BucketPolicy]:
        missing = [c for c in CHANNELS if c not in v]
        if missing:
            raise ValueError(f"missing buckets for channels {missing}")
        return v


def load_policy(data: dict | None, source: str = "alerts") -> ThrottlePolicy:
    """Validate a policy mapping, reporting every problem with its field path."""
    try:
        return ThrottlePolicy.model_validate(data or {})
    except ValidationError as exc:
        problems = "; ".join(f"{source}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InputError(f"Alert policy is invalid: {problems}.",
                         hint="Fix the alerts section (see ThrottlePolicy in scaler_wizard/alerts/throttle.py).") from None


@dataclass
class TokenBucket:
    """Classic token bucket, refilled lazily from the time of the last look."""

    capacity: float
    refill_per_s: float
    tokens: float = -1.0
    updated: float | None = None

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.refill_per_s)
        self.updated = now if self.updated is None else max(self.updated, now)

    def try_take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def seconds_until_token(self, now: float) -> float | None:
        self._refill(now)
        if self.tokens >= 1.0:
            return 0.0
        if self.refill_per_s <= 0:
            return None
        return (1.0 - self.tokens) / self.refill_per_s


@dataclass(frozen=True)
class ChannelDecision:
    outcome: Outcome
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"outcome": self.outcome, "reason": self.reason}


@dataclass(frozen=True)
class Decision:
    """The throttle's answer to one request."""

    request: AlertRequest
    effective_severity: Severity
    escalated: bool
    repeats: int  # alerts of this key folded since the last one that went through
    channels: dict[str, ChannelDecision]
    timestamp: str

    def granted(self, channel: Channel) -> bool:
        return self.channels[channel].outcome == "granted"

    def as_record(self) -> dict:
        return {
            "type": "decision",
            "schema_version": ALERTS_SCHEMA_VERSION,
            "timestamp": self.timestamp,
            "source": self.request.source,
            "severity": self.request.severity,
            "effective_severity": self.effective_severity,
            "escalated": self.escalated,
            "key": self.request.key,
            "message": self.request.message,
            "repeats": self.repeats,
            "channels": {c: d.as_dict() for c, d in self.channels.items()},
        }


@dataclass
class _KeyState:
    window_start: float | None = None  # first alert of the open dedup window
    folded: int = 0  # folded inside the current window, not yet reported by a passing alert
    escalated_at: float | None = None
    warnings: list[float] = field(default_factory=list)


@dataclass
class _Suppressed:
    """Digest accumulator for one key."""

    count: int = 0
    severity: str = "info"
    first: str = ""
    last: str = ""
    last_message: str = ""
    sources: set[str] = field(default_factory=set)
    channels: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CognitiveLoadThrottle:
    """Stateful throttle. Thread-safe (one lock), so safety callbacks and a UI thread may share it.

    ``log_path``: ``runs/<id>/alerts.jsonl`` (None: keep decisions in memory only).
    ``clock``: seconds since the epoch; inject a fake one in tests.
    """

    def __init__(self, policy: ThrottlePolicy | None = None, *, log_path: Path | None = None,
                 clock: Callable[[], float] = time.time):
        self.policy = policy or ThrottlePolicy()
        self.log_path = Path(log_path) if log_path is not None else None
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets = {c: TokenBucket(b.capacity, b.refill_per_s) for c, b in self.policy.buckets.items()}
        self._voice_busy_until = float("-inf")
        self._keys: dict[str, _KeyState] = {}
        self._pending: dict[str, _Suppressed] = {}
        self._digest_started = self.clock()
        self.digests: list[dict] = []

    # ---- public API -------------------------------------------------------------------------

    def set_mode(self, mode: Mode) -> None:
        """Switch normal / quiet / mute at run time (e.g. from the cockpit)."""
        with self._lock:
            self.policy = self.policy.model_copy(update={"mode": mode})

    def request(self, source: str, severity: Severity, message: str, key: str = "") -> Decision:
        """Convenience wrapper around :meth:`submit`."""
        return self.submit(AlertRequest(source=source, severity=severity, message=message, key=key))

    def submit(self, req: AlertRequest) -> Decision:
        """Decide every channel for one alert; emits a digest first when one is due."""
        with self._lock:
            now = self.clock()
            self._maybe_digest(now, force=False)
            decision = self._decide(req, now)
            self._remember_suppressed(decision, now)
            self._append(decision.as_record())
            return decision

    def tick(self) -> dict | None:
        """Emit the digest if its interval has passed (call this periodically when idle)."""
        with self._lock:
            return self._maybe_digest(self.clock(), force=False)

    def flush(self) -> dict | None:
        """Emit a digest of whatever is pending now (end of run)."""
        with self._lock:
            return self._maybe_digest(self.clock(), force=True)

    # ---- rules ------------------------------------------------------------------------------

    def _decide(self, req: AlertRequest, now: float) -> Decision:
        p = self.policy
        state = self._keys.setdefault(req.key, _KeyState())
        severity, escalated, newly_escalated = self._escalate(req, state, now)
        duplicate = (not newly_escalated and p.dedup_window_s > 0 and state.window_start is not None
                     and now - state.window_start < p.dedup_window_s)
        repeats = 0
        if duplicate:
            state.folded += 1
        else:  # this alert opens a new dedup window and reports what was folded in the last one
            state.window_start, repeats, state.folded = now, state.folded, 0
        channels: dict[str, ChannelDecision] = {}
        for ch in CHANNELS:
            if ch not in p.routes[severity]:
                channels[ch] = ChannelDecision("denied", f"severity {severity} does not use the {ch} channel")
            elif duplicate:
                channels[ch] = ChannelDecision(
                    "deferred", f"duplicate of key {req.key!r} within {p.dedup_window_s:g} s "
                                f"(folded, {state.folded} so far in this window)")
            else:
                channels[ch] = self._channel(ch, severity, now)
        return Decision(req, severity, escalated, repeats, channels, _iso(now))

    def _escalate(self, req: AlertRequest, state: _KeyState, now: float) -> tuple[Severity, bool, bool]:
        """(effective severity, escalated, newly escalated). A key stays critical for
        ``escalate_window_s`` after it escalated; only the escalating alert itself skips dedup."""
        p = self.policy
        if req.severity != "warning" or p.escalate_after <= 0:
            return req.severity, False, False
        if state.escalated_at is not None and now - state.escalated_at < p.escalate_window_s:
            return "critical", True, False
        state.warnings = [t for t in state.warnings if now - t < p.escalate_window_s] + [now]
        if len(state.warnings) >= p.escalate_after:
            state.warnings, state.escalated_at = [], now
            return "critical", True, True
        return "warning", False, False

    def _channel(self, ch: Channel, severity: Severity, now: float) -> ChannelDecision:
        p = self.policy
        critical = severity == "critical"
        held_by_mode = p.mode == "mute" and ch != "telegram" or p.mode == "quiet" and ch == "voice"
        if held_by_mode and not (critical and p.critical_breaks_mute):
            return ChannelDecision("deferred", f"{p.mode} mode holds the {ch} channel")
        if ch == "voice" and now < self._voice_busy_until:
            return ChannelDecision("deferred", f"another voice alert is playing for {self._voice_busy_until - now:.1f} s")
        if ch == "visual" and p.voice_preempts_visual and not critical and now < self._voice_busy_until:
            return ChannelDecision("deferred", "a voice alert is playing (voice pre-empts visual)")
        bucket = self._buckets[ch]
        if not bucket.try_take(now):
            wait = bucket.seconds_until_token(now)
            when = f"next token in {wait:.1f} s" if wait is not None else "bucket never refills"
            return ChannelDecision("deferred", f"rate limit of the {ch} channel ({when})")
        if ch == "voice":
            self._voice_busy_until = now + p.voice_duration_s
        return ChannelDecision("granted", f"{severity} alert on {ch}")

    # ---- digest -----------------------------------------------------------------------------

    def _remember_suppressed(self, d: Decision, now: float) -> None:
        held = {c: cd for c, cd in d.channels.items() if cd.outcome == "deferred"}
        if not held:
            return
        acc = self._pending.setdefault(d.request.key, _Suppressed(first=d.timestamp))
        acc.count += 1
        if SEVERITY_RANK[d.effective_severity] >= SEVERITY_RANK[acc.severity]:
            acc.severity = d.effective_severity
        acc.last = d.timestamp
        acc.last_message = d.request.message
        acc.sources.add(d.request.source)
        for ch in held:
            acc.channels[ch] = acc.channels.get(ch, 0) + 1
        for kind in {_reason_kind(cd.reason) for cd in held.values()}:  # per alert, not per channel
            acc.reasons[kind] = acc.reasons.get(kind, 0) + 1

    def _maybe_digest(self, now: float, *, force: bool) -> dict | None:
        due = now - self._digest_started >= self.policy.digest_interval_s
        if not (force or due):
            return None
        if not self._pending:
            if due:
                self._digest_started = now
            return None
        items = sorted(self._pending.items(), key=lambda kv: (-SEVERITY_RANK[kv[1].severity], -kv[1].count, kv[0]))
        by_channel: dict[str, int] = {}
        for _, acc in items:
            for ch, n in acc.channels.items():
                by_channel[ch] = by_channel.get(ch, 0) + n
        digest = {
            "type": "digest",
            "schema_version": ALERTS_SCHEMA_VERSION,
            "timestamp": _iso(now),
            "window_start": _iso(self._digest_started),
            "window_end": _iso(now),
            "suppressed_alerts": sum(acc.count for _, acc in items),
            "by_channel": by_channel,
            "keys": [
                {"key": key, "count": acc.count, "severity": acc.severity, "first": acc.first, "last": acc.last,
                 "last_message": acc.last_message, "sources": sorted(acc.sources), "channels": acc.channels,
                 "reasons": acc.reasons}
                for key, acc in items
            ],
        }
        self._pending.clear()
        self._digest_started = now
        self.digests.append(digest)
        self._append(digest)
        return digest

    def _append(self, record: dict) -> None:
        if self.log_path is None:
            return
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")


def _reason_kind(reason: str) -> str:
    for prefix, kind in (("duplicate", "duplicate"), ("rate limit", "rate_limited"), ("another voice", "voice_busy"),
                         ("a voice alert", "preempted_by_voice")):
        if reason.startswith(prefix):
            return kind
    return "quiet_or_mute" if "mode holds" in reason else "other"
