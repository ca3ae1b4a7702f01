"""Safety Envelope (spec module 4): pure rules over rolling training metrics that turn each
observation into a telegram ``continue | warn | stop``.

Rules (each a small function below; thresholds in :class:`EnvelopeConfig`):

* **non-finite** loss, gradient norm or eval perplexity -> ``stop`` at once. OLMo-core treats a
  non-finite loss as fatal; HF Trainer's default ``logging_nan_inf_filter`` would hide it, so
  the trainer must log with that filter off.
* **spike** of the loss or the gradient norm -> ``warn``; ``repeat_to_stop`` spikes within
  ``repeat_window`` steps -> ``stop`` (by default for the loss only; see
  :class:`GradNormSpikeRuleConfig`). A spike is either
  - a robust z-score above ``z_threshold`` over the last ``window`` observations: z =
    (x - median) / (1.4826 * MAD) (Hampel's median/MAD estimator; 1.4826 makes the MAD a
    consistent estimate of sigma under a normal distribution). Defaults follow OLMo-core, which
    skips an update whose loss or grad norm exceeds 6 sigma over the last 128 steps; median/MAD
    instead of mean/std so that earlier spikes do not inflate the scale and mask later ones;
  - or a ratio above ``max_ratio`` to the running maximum (Megatron-LM flags a loss 10x the
    largest seen).
  Only upward deviations count: a loss falling fast early in training is not a spike. The
  series restart at each context stage (:meth:`SafetyEnvelope.begin_stage`): a longer context
  legitimately moves the loss.
* **evaluation regression** vs the base model: eval perplexity over base perplexity above
  ``perplexity_warn_ratio`` -> warn, above ``perplexity_stop_ratio`` -> stop; short-context
  perplexity regression in % above ``short_context_warn_pct`` (Position Interpolation reports
  "up to 2%") -> warn, above ``short_context_stop_pct`` -> stop.
* **accuracy floor**: a metric matching a pattern in ``accuracy_floors`` below its floor ->
  ``accuracy_floor_action``.
* **throughput collapse**: tokens/s below ``collapse_ratio`` x its rolling median -> warn
  (swapping, thermal throttling, a stuck data loader: worth a look, not a halt).

The stop policy (``on_stop: halt | rollback``, ``max_rollbacks``, ``lr_factor``,
``skip_batches``) is part of the config; the envelope only *decides* — restoring a snapshot is
the pipeline's job, which then calls :meth:`SafetyEnvelope.record_rollback`. PaLM's remedy for
loss spikes was to restart from a checkpoint ~100 steps earlier and skip 200-500 batches.

No torch here: the envelope is tested on synthetic series and imported by the cockpit.
"""

from __future__ import annotations

import fnmatch
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from statistics import median
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..telemetry.sink import non_finite_label, utc_now

Action = Literal["continue", "warn", "stop"]
Severity = Literal["warn", "stop"]
Resolution = Literal["halt", "rollback"]
TELEGRAM_SCHEMA_VERSION = 1
MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD -> sigma for normal data
_RANK = {"continue": 0, "warn": 1, "stop": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SpikeRuleConfig(_Strict):
    """Spike detection for one series (loss or gradient norm)."""

    enabled: bool = True
    window: int = Field(128, ge=4, description="rolling window in observations (OLMo-core: 128 steps)")
    # 8, not 16: the envelope restarts its history at each stage, and a stage logs only 10-12
    # times in the demo recipe; with 16 the z-score rule never woke up there (bench/faults.py,
    # loss_spikes: 0 of 84 early x3 spikes found with 16, all loss false positives 0 with 8).
    min_history: int = Field(8, ge=2, description="observations needed before the z-score rule applies")
    z_threshold: float = Field(6.0, gt=0, description="robust z-score limit (OLMo-core: 6 sigma)")
    min_relative_excess: float = Field(
        0.05, ge=0, description="a spike must also exceed the median by this fraction (guards a near-zero MAD)"
    )
    max_ratio: float | None = Field(10.0, gt=1, description="ratio to the running max (Megatron-LM: 10x)")
    ratio_min_history: int = Field(4, ge=1, description="observations needed before the ratio rule applies")
    repeat_to_stop: int | None = Field(
        3, ge=1, description="this many spikes within repeat_window steps -> stop; None: spikes only warn"
    )
    repeat_window: int = Field(50, ge=1, description="in training steps")


# The pre-clipping gradient norm shifts level in healthy runs (end of warm-up, a model starting to
# fit its data): on the tiny benchmark model it doubled within three steps while the loss kept
# falling, and a 5% excess plus "3 spikes -> stop" halted that healthy run. Gradient clipping
# bounds the update anyway, so by default a grad-norm spike must be at least 2x the median and
# repeated spikes only warn; the loss rules (and non-finite grad norms) carry the stops. Set
# ``grad_norm.repeat_to_stop`` to make repeated grad-norm spikes stop.
class GradNormSpikeRuleConfig(SpikeRuleConfig):
    min_history: int = Field(16, ge=2, description="the grad norm settles later than the loss: longer warm-up")
    min_relative_excess: float = Field(1.0, ge=0, description="a grad-norm spike is at least 2x the median")
    repeat_to_stop: int | None = Field(None, ge=1, description="None: repeated grad-norm spikes only warn")


class EvalRuleConfig(_Strict):
    perplexity_warn_ratio: float | None = Field(1.10, gt=1, description="eval ppl / base ppl above this -> warn")
    perplexity_stop_ratio: float | None = Field(1.50, gt=1, description="eval ppl / base ppl above this -> stop")
    short_context_warn_pct: float | None = Field(2.0, ge=0, description="PI reports up to 2% regression")
    short_context_stop_pct: float | None = Field(10.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> EvalRuleConfig:
        pairs = [("perplexity_warn_ratio", "perplexity_stop_ratio"), ("short_context_warn_pct", "short_context_stop_pct")]
        for warn, stop in pairs:
            w, s = getattr(self, warn), getattr(self, stop)
            if w is not None and s is not None and s < w:
                raise ValueError(f"{stop} ({s}) must be >= {warn} ({w})")
        return self


class ThroughputRuleConfig(_Strict):
    enabled: bool = True
    window: int = Field(32, ge=2)
    min_history: int = Field(5, ge=1)
    collapse_ratio: float = Field(0.5, gt=0, lt=1, description="tokens/s below this x rolling median -> warn")


class RollbackPolicy(_Strict):
    """What a ``stop`` leads to. ``rollback`` restores the last good snapshot, skips the
    offending batches and multiplies the learning rate by ``lr_factor`` (PaLM), at most
    ``max_rollbacks`` times per run; after that a stop halts."""

    on_stop: Resolution = "halt"
    max_rollbacks: int = Field(2, ge=0)
    lr_factor: float = Field(0.5, gt=0, le=1)
    skip_batches: int | None = Field(
        None, ge=0, description="batches to skip after the restored step; None = all seen since the snapshot"
    )


class EnvelopeConfig(_Strict):
    loss_metric: str = "train/loss"
    grad_norm_metric: str = "train/grad_norm"
    throughput_metric: str = "train/tokens_per_s"
    perplexity_metrics: str = Field("eval/perplexity@*", description="fnmatch pattern")
    short_context_metrics: str = Field("eval/short_context_regression_pct@*", description="fnmatch pattern")
    loss: SpikeRuleConfig = Field(default_factory=SpikeRuleConfig)
    grad_norm: GradNormSpikeRuleConfig = Field(default_factory=GradNormSpikeRuleConfig)
    evaluation: EvalRuleConfig = Field(default_factory=EvalRuleConfig)
    accuracy_floors: dict[str, float] = Field(
        default_factory=dict, description="fnmatch pattern -> minimum, e.g. {'probe/passkey@*': 0.5}"
    )
    accuracy_floor_action: Severity = "stop"
    throughput: ThroughputRuleConfig = Field(default_factory=ThroughputRuleConfig)
    policy: RollbackPolicy = Field(default_factory=RollbackPolicy)


@dataclass
class Finding:
    rule: str  # non_finite | spike | repeated_spike | perplexity_regression | short_context_regression | ...
    severity: Severity
    message: str
    metric: str | None = None
    value: float | None = None
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("value", "threshold"):
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None
        return d


@dataclass
class Telegram:
    """The envelope's output; :meth:`to_dict` is the JSON contract (telegram.schema.json)."""

    action: Action
    reasons: list[str]
    step: int
    stage: int | None
    metrics: dict[str, float]
    timestamp: str = field(default_factory=utc_now)
    findings: list[Finding] = field(default_factory=list)
    source: Literal["envelope", "operator"] = "envelope"
    resolution: Resolution | None = None
    rollbacks_used: int = 0
    max_rollbacks: int = 0
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        metrics: dict[str, float | None] = {}
        non_finite: dict[str, str] = {}
        for name, value in self.metrics.items():
            label = non_finite_label(float(value))
            metrics[name] = None if label else float(value)
            if label:
                non_finite[name] = label
        out: dict[str, Any] = {
            "schema_version": TELEGRAM_SCHEMA_VERSION,
            "action": self.action,
            "reasons": list(self.reasons),
            "step": int(self.step),
            "stage": self.stage,
            "metrics": metrics,
            "timestamp": self.timestamp,
            "source": self.source,
            "findings": [f.to_dict() for f in self.findings],
            "resolution": self.resolution,
            "rollbacks_used": self.rollbacks_used,
            "max_rollbacks": self.max_rollbacks,
            "run_id": self.run_id,
        }
        if non_finite:
            out["non_finite"] = non_finite
        return out


# ---------------------------------------------------------------------------------------------
# Rules: pure functions of (value, history, config) -> findings
# ---------------------------------------------------------------------------------------------


def robust_z(value: float, history: list[float]) -> tuple[float, float, float]:
    """(z, median, sigma) with sigma = 1.4826 * MAD (Hampel); z is +inf when MAD is 0 and
    ``value`` is above the median."""
    med = median(history)
    mad = median(abs(x - med) for x in history)
    sigma = MAD_TO_SIGMA * mad
    if sigma > 0:
        return (value - med) / sigma, med, sigma
    return (math.inf if value > med else 0.0), med, sigma


def check_non_finite(metric: str, value: float) -> list[Finding]:
    if math.isfinite(value):
        return []
    return [Finding("non_finite", "stop", f"{metric} is {non_finite_label(value)}", metric, value)]


def check_spike(metric: str, value: float, history: list[float], running_max: float | None,
                cfg: SpikeRuleConfig) -> Finding | None:
    """One spike finding (severity warn; escalation to stop is the caller's, by repetition)."""
    if not cfg.enabled or not math.isfinite(value):
        return None
    if cfg.max_ratio is not None and running_max is not None and running_max > 0 \
            and len(history) >= cfg.ratio_min_history and value > cfg.max_ratio * running_max:
        return Finding("spike", "warn", f"{metric} {value:.4g} is {value / running_max:.1f}x the running max "
                       f"{running_max:.4g} (limit {cfg.max_ratio:g}x)", metric, value, cfg.max_ratio * running_max)
    if len(history) < cfg.min_history:
        return None
    z, med, sigma = robust_z(value, history)
    if z > cfg.z_threshold and value - med > cfg.min_relative_excess * abs(med):
        limit = med + cfg.z_threshold * sigma
        return Finding("spike", "warn", f"{metric} {value:.4g} is {z:.1f} robust sigma above the median {med:.4g} "
                       f"of the last {len(history)} (limit {cfg.z_threshold:g} sigma)", metric, value, limit)
    return None


def check_ratio_to_base(metric: str, value: float, base: float | None, warn: float | None, stop: float | None,
                        rule: str) -> list[Finding]:
    if base is None or base <= 0 or not math.isfinite(base):
        return []
    if not math.isfinite(value):
        return [Finding("non_finite", "stop", f"{metric} is {non_finite_label(value)}", metric, value)]
    ratio = value / base
    for severity, limit in (("stop", stop), ("warn", warn)):
        if limit is not None and ratio > limit:
            return [Finding(rule, severity, f"{metric} {value:.4g} is {ratio:.3f}x the base model's {base:.4g} "
                            f"(limit {limit:g}x)", metric, value, limit * base)]
    return []


def check_above(metric: str, value: float, warn: float | None, stop: float | None, rule: str, unit: str = "") -> list[Finding]:
    if not math.isfinite(value):
        return [Finding(rule, "stop", f"{metric} is {non_finite_label(value)}", metric, value, stop)]
    for severity, limit in (("stop", stop), ("warn", warn)):
        if limit is not None and value > limit:
            return [Finding(rule, severity, f"{metric} {value:.4g}{unit} exceeds {limit:g}{unit}", metric, value, limit)]
    return []


def check_accuracy_floor(metric: str, value: float, floors: Mapping[str, float], action: Severity) -> list[Finding]:
    for pattern, floor in floors.items():
        if fnmatch.fnmatchcase(metric, pattern) and not value >= floor:  # NaN counts as below
            return [Finding("accuracy_floor", action, f"{metric} {value:.4g} is below its floor {floor:g}",
                            metric, value, floor)]
    return []


def check_throughput(metric: str, value: float, history: list[float], cfg: ThroughputRuleConfig) -> list[Finding]:
    if not cfg.enabled or len(history) < cfg.min_history or not math.isfinite(value):
        return []
    med = median(history)
    if med > 0 and value < cfg.collapse_ratio * med:
        return [Finding("throughput_collapse", "warn", f"{metric} {value:.4g} is {value / med:.0%} of its rolling "
                        f"median {med:.4g} (limit {cfg.collapse_ratio:.0%})", metric, value, cfg.collapse_ratio * med)]
    return []


# ---------------------------------------------------------------------------------------------
# State: rolling series and the envelope
# ---------------------------------------------------------------------------------------------


class SpikeSeries:
    """Rolling window, running max and recent spike steps for one monitored series."""

    def __init__(self, metric: str, cfg: SpikeRuleConfig):
        self.metric = metric
        self.cfg = cfg
        self.window: deque[tuple[int, float]] = deque(maxlen=cfg.window)
        self.max_records: list[tuple[int, float]] = []  # (step, new running max), increasing
        self.spike_steps: deque[int] = deque()

    @property
    def running_max(self) -> float | None:
        return self.max_records[-1][1] if self.max_records else None

    def observe(self, step: int, value: float) -> list[Finding]:
        findings = check_non_finite(self.metric, value)
        if findings:
            return findings
        spike = check_spike(self.metric, value, [v for _, v in self.window], self.running_max, self.cfg)
        if spike is not None:
            findings.append(spike)
            self.spike_steps.append(step)
            while self.spike_steps and self.spike_steps[0] <= step - self.cfg.repeat_window:
                self.spike_steps.popleft()
            if self.cfg.repeat_to_stop is not None and len(self.spike_steps) >= self.cfg.repeat_to_stop:
                findings.append(Finding("repeated_spike", "stop", f"{len(self.spike_steps)} spikes of {self.metric} "
                                        f"within {self.cfg.repeat_window} steps (limit {self.cfg.repeat_to_stop})",
                                        self.metric, value, float(self.cfg.repeat_to_stop)))
        self.window.append((step, value))
        if self.running_max is None or value > self.running_max:
            self.max_records.append((step, value))
        return findings

    def truncate(self, to_step: int) -> None:
        """Forget observations after ``to_step`` (a rollback restored the state of that step)."""
        self.window = deque(((s, v) for s, v in self.window if s <= to_step), maxlen=self.cfg.window)
        self.max_records = [(s, v) for s, v in self.max_records if s <= to_step]
        self.spike_steps.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"window": [list(x) for x in self.window], "max_records": [list(x) for x in self.max_records],
                "spike_steps": list(self.spike_steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.window = deque(((int(s), float(v)) for s, v in state["window"]), maxlen=self.cfg.window)
        self.max_records = [(int(s), float(v)) for s, v in state["max_records"]]
        self.spike_steps = deque(int(s) for s in state["spike_steps"])


def _strip_base_prefix(name: str) -> str:
    return name.removeprefix("base/")


class SafetyEnvelope:
    """Feed it metrics with :meth:`observe`; it returns a :class:`Telegram` each time.

    ``baseline`` maps eval metric names (``eval/perplexity@1024``; a ``base/`` prefix as the
    pipeline logs base probes is accepted) to the base model's values.
    """

    def __init__(self, config: EnvelopeConfig | None = None, *, baseline: Mapping[str, float] | None = None,
                 run_id: str | None = None):
        self.config = config or EnvelopeConfig()
        self.run_id = run_id
        self.baseline: dict[str, float] = {}
        self.rollbacks_used = 0
        self.rollback_steps: list[int] = []
        self.stage: int | None = None
        self.loss = SpikeSeries(self.config.loss_metric, self.config.loss)
        self.grad_norm = SpikeSeries(self.config.grad_norm_metric, self.config.grad_norm)
        self.throughput: deque[tuple[int, float]] = deque(maxlen=self.config.throughput.window)
        if baseline:
            self.set_baseline(baseline)

    def begin_stage(self, stage: int | None) -> None:
        """A new context stage changes the loss level (longer sequences): forget the rolling
        series so the first steps of the stage are not read as spikes. Same stage: no-op."""
        if stage == self.stage:
            return
        self.stage = stage
        self.loss = SpikeSeries(self.config.loss_metric, self.config.loss)
        self.grad_norm = SpikeSeries(self.config.grad_norm_metric, self.config.grad_norm)
        self.throughput = deque(maxlen=self.config.throughput.window)

    def set_baseline(self, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.baseline[_strip_base_prefix(name)] = float(value)

    # -- decisions ------------------------------------------------------------------------------
    def findings_for(self, step: int, metrics: Mapping[str, float]) -> list[Finding]:
        cfg = self.config
        findings: list[Finding] = []
        for name, raw in metrics.items():
            value = float(raw)
            if name == cfg.loss_metric:
                findings += self.loss.observe(step, value)
            elif name == cfg.grad_norm_metric:
                findings += self.grad_norm.observe(step, value)
            elif name == cfg.throughput_metric:
                findings += check_throughput(name, value, [v for _, v in self.throughput], cfg.throughput)
                if math.isfinite(value):
                    self.throughput.append((step, value))
            elif fnmatch.fnmatchcase(name, cfg.perplexity_metrics):
                e = cfg.evaluation
                if not math.isfinite(value):
                    findings += check_non_finite(name, value)
                else:
                    findings += check_ratio_to_base(name, value, self.baseline.get(name), e.perplexity_warn_ratio,
                                                    e.perplexity_stop_ratio, "perplexity_regression")
            elif fnmatch.fnmatchcase(name, cfg.short_context_metrics):
                e = cfg.evaluation
                findings += check_above(name, value, e.short_context_warn_pct, e.short_context_stop_pct,
                                        "short_context_regression", "%")
            findings += check_accuracy_floor(name, value, cfg.accuracy_floors, cfg.accuracy_floor_action)
        return findings

    def resolve_stop(self) -> Resolution:
        """What a stop means now: rollback while the policy allows one, halt otherwise."""
        p = self.config.policy
        return "rollback" if p.on_stop == "rollback" and self.rollbacks_used < p.max_rollbacks else "halt"

    def _telegram(self, findings: list[Finding], step: int, stage: int | None, metrics: Mapping[str, float],
                  source: Literal["envelope", "operator"] = "envelope", resolution: Resolution | None = None,
                  timestamp: str | None = None) -> Telegram:
        action: Action = "continue"
        for f in findings:
            if _RANK[f.severity] > _RANK[action]:
                action = f.severity
        if action == "stop" and resolution is None:
            resolution = self.resolve_stop()
        return Telegram(
            action=action, reasons=[f.message for f in findings], step=int(step), stage=stage,
            metrics={k: float(v) for k, v in metrics.items()}, timestamp=timestamp or utc_now(),
            findings=findings, source=source, resolution=resolution if action == "stop" else None,
            rollbacks_used=self.rollbacks_used, max_rollbacks=self.config.policy.max_rollbacks, run_id=self.run_id,
        )

    def observe(self, step: int, metrics: Mapping[str, float], *, stage: int | None = None,
                timestamp: str | None = None) -> Telegram:
        """Apply every rule to one observation (any subset of metrics) and decide."""
        return self._telegram(self.findings_for(step, metrics), step, stage, metrics, timestamp=timestamp)

    def operator_stop(self, step: int, reason: str, *, stage: int | None = None,
                      resolution: Resolution = "halt", metrics: Mapping[str, float] | None = None) -> Telegram:
        """A stop requested by a person (abort / rollback command), as a telegram."""
        finding = Finding("operator", "stop", reason)
        return self._telegram([finding], step, stage, metrics or {}, source="operator", resolution=resolution)

    # -- rollback bookkeeping ---------------------------------------------------------------------
    def record_rollback(self, to_step: int) -> None:
        """The pipeline restored the snapshot of ``to_step``: count it and forget what came after."""
        self.rollbacks_used += 1
        self.rollback_steps.append(int(to_step))
        self.loss.truncate(to_step)
        self.grad_norm.truncate(to_step)
        self.throughput = deque(((s, v) for s, v in self.throughput if s <= to_step),
                                maxlen=self.config.throughput.window)

    def rollback_lr(self, learning_rate: float) -> float:
        """The learning rate after one more rollback (PaLM lowered it on restart)."""
        return learning_rate * self.config.policy.lr_factor

    # -- exact resume: JSON-able state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks_used": self.rollbacks_used, "rollback_steps": list(self.rollback_steps), "stage": self.stage,
                "baseline": dict(self.baseline), "loss": self.loss.state_dict(),
                "grad_norm": self.grad_norm.state_dict(), "throughput": [list(x) for x in self.throughput]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rollbacks_used = int(state["rollbacks_used"])
        self.rollback_steps = [int(s) for s in state["rollback_steps"]]
        self.stage = state.get("stage")
        self.baseline = {k: float(v) for k, v in state["baseline"].items()}
        self.loss.load_state_dict(state["loss"])
        self.grad_norm.load_state_dict(state["grad_norm"])
        self.throughput = deque(((int(s), float(v)) for s, v in state["throughput"]),
                                maxlen=self.config.throughput.window)


__all__ = [
    "EnvelopeConfig",
    "EvalRuleConfig",
    "Finding",
    "GradNormSpikeRuleConfig",
    "RollbackPolicy",
    "SafetyEnvelope",
    "SpikeRuleConfig",
    "SpikeSeries",
    "Telegram",
    "ThroughputRuleConfig",
    "check_accuracy_floor",
    "check_non_finite",
    "check_spike",
    "robust_z",
]
