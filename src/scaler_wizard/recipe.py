"""The typed recipe: one pydantic model drives YAML loading, validation and defaults.

Every validation problem is reported at once with its field path (``RecipeError``). Unknown
keys are errors (a typo must never be silently ignored).

Paths may use the ``builtin:`` prefix for files shipped inside the package
(``builtin:demo`` is the embedded demo model, ``builtin:demo/train.jsonl`` its data).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .alerts.throttle import ThrottlePolicy
from .errors import RecipeError
from .safety.envelope import EnvelopeConfig
from .telemetry.remote import RemoteSinkConfig

BUILTIN_PREFIX = "builtin:"
DEMO_RECIPE = "builtin:recipes/demo.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Strict):
    name: str = "scaling-run"
    seed: int = 1234
    run_id: str | None = Field(None, description="defaults to <name>-<UTC timestamp>")
    output_dir: str = "runs"

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or "\\" in v or v.startswith(".")):
            raise ValueError("must be a plain folder name (no slashes, not starting with '.')")
        return v


class ModelSection(_Strict):
    path: str = Field(..., description="a Hugging Face model folder, or builtin:demo")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


class DataSection(_Strict):
    train: list[str] = Field(..., min_length=1, description="jsonl/json/txt/parquet files or a saved datasets folder")
    eval: list[str] = Field(default_factory=list, description="held-out data; defaults to a split of train")
    text_field: str = "text"
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    synthetic_passkey_share: float = Field(
        0.0, ge=0, le=1, description="fraction of training rows that are passkey retrieval examples"
    )
    packing: bool = Field(False, description="pack the variable-length passkey examples several to a row "
                          "(position ids restart per example, no attention across them) instead of padding")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class LoraSection(_Strict):
    rank: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = Field(default_factory=list, description="e.g. norms / embeddings (LongLoRA)")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="per-module ranks (PEFT rank_pattern)")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="per-module alphas (PEFT)")


class BlockExpansionSection(_Strict):
    """LLaMA Pro style growth: new identity-initialised decoder blocks, old blocks frozen."""

    new_blocks: int = Field(1, ge=1, description="decoder blocks to insert (at most one per original block)")
    train_norms: bool = False
    train_embeddings: bool = False


class ScalingSection(_Strict):
    strategy: str = Field("lora", description="lora | block_expansion | a plugin strategy (entry points)")
    lora: LoraSection = Field(default_factory=LoraSection)
    block_expansion: BlockExpansionSection = Field(default_factory=BlockExpansionSection)
    options: dict[str, Any] = Field(default_factory=dict, description="options of a plugin strategy")


class ContextSection(_Strict):
    target_length: int = Field(..., gt=0)
    base_length: int | None = Field(None, gt=0, description="defaults to the model's max_position_embeddings")
    method: str = "yarn"
    method_params: dict[str, Any] = Field(default_factory=dict)
    schedule: list[int] | None = Field(None, description="explicit stage lengths; default doubles up to target")
    gate_policy: Literal["extend", "stop", "rollback", "continue"] = "extend"
    pose: bool = Field(False, description="positional skip-wise training (PoSE, Zhu et al. 2023): train each "
                       "stage on base-length windows whose position ids skip up to the stage length")
    pose_chunks: int = Field(2, ge=2, le=16, description="chunks per PoSE window (each after the first skips)")
    manual_gates: bool = Field(False, description="wait for an operator's approve (cockpit / control.jsonl) "
                               "before each next stage")
    manual_gate_timeout_s: float | None = Field(None, gt=0, description="give up waiting (run halted); None: wait")


class TrainingSection(_Strict):
    steps_per_stage: int | list[int] = Field(60, description="one budget for every stage, or one per stage")
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(5, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(5, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")
    loss_chunk_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="sequence positions per chunk of the chunked losses (every row of the micro-batch is "
        "in each chunk); auto: as many as fit 256 MB of logits and temporaries, one chunk when all fit")
    snapshot_every: int = Field(25, ge=0, description="optimizer steps between resumable snapshots "
                                "(adapters, optimizer, scheduler, RNG, data position); 0: stage boundaries only")
    optimizer_scope: Literal["stage", "run"] = Field(
        "stage", description="stage: a fresh optimizer and LR schedule (with its warm-up) per stage and attempt; "
        "run: one AdamW and one schedule over the whole run (warm-up once, moments carried across stages, "
        "extensions and rollbacks; stage snapshots hold their state)")
    task_weights: dict[Literal["lm", "retrieval"], Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"lm": 1.0, "retrieval": 1.0},
        description="train/loss = sum over the tasks in a batch of weight x that task's mean token CE "
        "(lm: every token of a text window; retrieval: the answer tokens of a synthetic needle row)")

    @field_validator("steps_per_stage")
    @classmethod
    def _positive(cls, v: int | list[int]) -> int | list[int]:
        values = v if isinstance(v, list) else [v]
        if not values or any(s < 1 for s in values):
            raise ValueError("every stage needs at least 1 step")
        return v


class PasskeyProbeSection(_Strict):
    enabled: bool = True
    trials: int = Field(50, ge=1, description="trials per length, spread evenly over depths")
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    seed: int = 4242
    min_accuracy: float = Field(0.8, ge=0, le=1, description="stage gate")


class PerplexityProbeSection(_Strict):
    enabled: bool = True
    windows: int = Field(16, ge=1, description="non-overlapping windows of held-out text per length")
    max_ratio_to_base: float = Field(
        1.25, gt=0, description="stage gate: ppl at stage length / base ppl at base length"
    )


class ShortContextProbeSection(_Strict):
    enabled: bool = True
    max_regression_pct: float = Field(10.0, ge=0, description="stage gate on ppl at base length vs base model")


class CustomProbeSection(_Strict):
    name: str = Field(..., description="a probe from the scaler_wizard.probes entry points or probe_dirs")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the probe class")


class EvaluationSection(_Strict):
    probe_dirs: list[str] = Field(default_factory=list, description="folders of drop-in probe files (*.py)")
    custom: list[CustomProbeSection] = Field(default_factory=list, description="extra probes run after each stage")
    passkey: PasskeyProbeSection = Field(default_factory=PasskeyProbeSection)
    perplexity: PerplexityProbeSection = Field(default_factory=PerplexityProbeSection)
    short_context: ShortContextProbeSection = Field(default_factory=ShortContextProbeSection)
    evaluate_base_at: list[int] | None = Field(None, description="lengths to probe the base model at")


class DistillationSection(_Strict):
    """Knowledge preservation: ``(1-kd_weight)*CE + kd_weight*T^2*KD`` against a teacher."""

    enabled: bool = False
    teacher: Literal["base", "model", "offline"] = Field(
        "base", description="base: the student's own frozen weights, adapters off, original positions"
    )
    teacher_path: str | None = Field(None, description="model folder for teacher: model")
    cache: str | None = Field(None, description="offline top-k cache folder (scaler-wizard distill cache)")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="JSD(beta) mixing weight")
    temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(0.5, ge=0, le=1)
    replay_ratio: float = Field(0.0, ge=0, lt=1, description="share of rows replaced by base-length replay rows")
    teacher_context_length: int | None = Field(None, gt=0, description="default: the base context")

    @model_validator(mode="after")
    def _teacher_source(self) -> DistillationSection:
        if self.enabled and self.teacher == "model" and not self.teacher_path:
            raise ValueError("distillation.teacher_path is required when teacher is 'model'")
        if self.enabled and self.teacher == "offline" and not self.cache:
            raise ValueError("distillation.cache is required when teacher is 'offline'")
        return self


class TelemetrySection(_Strict):
    remote: RemoteSinkConfig = Field(default_factory=RemoteSinkConfig)
    mirrors: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="also report the Trainer's logs there (transformers' report_to; "
        "the package must be installed); metrics.jsonl stays the record")


class OutputSection(_Strict):
    merge: bool = Field(True, description="also save merged weights in model/")
    save_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class Recipe(_Strict):
    recipe_version: Literal[1] = 1
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    data: DataSection
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    context: ContextSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    distillation: DistillationSection = Field(default_factory=DistillationSection)
    safety: EnvelopeConfig = Field(default_factory=EnvelopeConfig)
    alerts: ThrottlePolicy = Field(default_factory=ThrottlePolicy)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        ctx = self.context
        if ctx.base_length is not None and ctx.target_length <= ctx.base_length:
            raise ValueError(
                f"context.target_length ({ctx.target_length}) must exceed context.base_length ({ctx.base_length})"
            )
        if ctx.pose and self.data.packing:
            raise ValueError("context.pose and data.packing cannot be combined: PoSE rows keep one base-length "
                             "window per row with skipping position ids; set one of them to false")
        return self

    def digest(self) -> str:
        """Canonical sha256 of the recipe (sorted keys, no whitespace)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()


def resolve_path(value: str, base_dir: Path | None = None) -> Path:
    """``builtin:x`` -> a file shipped in the package; relative paths -> relative to the recipe."""
    if value.startswith(BUILTIN_PREFIX):
        rel = value[len(BUILTIN_PREFIX) :]
        root = Path(str(resources.files("scaler_wizard")))
        if rel == "demo":
            return root / "assets" / "demo_model"
        if rel.startswith("demo/"):
            return root / "assets" / "demo_data" / rel[len("demo/") :]
        return root / rel
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(x) for x in loc) if loc else "(recipe)"


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(source, [("(recipe)", "must be a YAML mapping of sections (model, data, context, ...)")])
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [(_format_loc(err["loc"]), err["msg"]) for err in exc.errors()]
        raise RecipeError(source, problems) from None


def load_recipe(path: str | Path | None = None) -> tuple[Recipe, Path]:
    """Load and validate a recipe; returns it with the folder its relative paths are resolved against."""
    if path is None:
        path = DEMO_RECIPE
    file = resolve_path(str(path))
    if not file.is_file():
        raise RecipeError(str(path), [("(file)", f"not found at {file}; pass the path of a YAML recipe")])
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise RecipeError(str(path), [("(yaml)", f"not valid YAML at {where}: {getattr(exc, 'problem', exc)}")])
    except UnicodeDecodeError:
        raise RecipeError(str(path), [("(file)", "is not UTF-8 text")]) from None
    return parse_recipe(data, str(path)), file.parent
