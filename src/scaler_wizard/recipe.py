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
from .fsutil import is_safe_name
from .safety.envelope import EnvelopeConfig
from .telemetry.remote import RemoteSinkConfig

BUILTIN_PREFIX = "builtin:"
DEMO_RECIPE = "builtin:recipes/demo.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Strict):
    """Which run this is and where its folder goes."""

    name: str = Field("scaling-run", description="names the run folder (<name>-<UTC timestamp>) and the report; "
                      "up to 48 of A-Z a-z 0-9 . _ -")
    seed: int = Field(1234, description="seed of the run's random choices (adapter initialisation, data order, "
                      "held-out split, synthetic rows); the passkey probe has its own")
    run_id: str | None = Field(None, description="the run folder's name (up to 64 of A-Z a-z 0-9 . _ -, the contract's session_id rule); defaults "
                               "to <name>-<UTC timestamp>")
    output_dir: str = Field("runs", description="folder that receives the run folders (relative: to the current "
                            "directory)")

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        if v is not None and (not is_safe_name(v) or len(v) > 64):
            raise ValueError("must be a plain folder name: 1-64 characters from A-Z a-z 0-9 . _ -, starting with "
                             "a letter or digit, without '..'")
        return v

    @field_validator("name")
    @classmethod
    def _name_makes_a_run_id(cls, v: str) -> str:
        if not is_safe_name(v) or len(v) > 48:  # + "-YYYYmmdd-HHMMSS" (run_record.generated_run_id) <= 64
            raise ValueError("becomes the run folder <name>-<UTC timestamp>: use up to 48 characters from A-Z a-z "
                             "0-9 . _ -, starting with a letter or digit, without '..'")
        return v


class QuantizationSection(_Strict):
    """QLoRA: the frozen base weights loaded in 4 or 8 bits through bitsandbytes (CUDA only)."""

    bits: Literal[4, 8] = Field(4, description="4 (QLoRA's NF4/FP4) or 8 (LLM.int8)")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (ignored for 8 bits)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for the matmuls")
    double_quant: bool = Field(True, description="quantize the 4-bit quantization constants too")


class ModelSection(_Strict):
    """The model to grow: a local Hugging Face causal LM folder (safetensors weights only)."""

    path: str = Field(..., description="a Hugging Face model folder, or builtin:demo")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the model is loaded and "
                                                             "trained in")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="transformers' attention kernel (flash_attention_2 needs the flash-attn package and a GPU)")

    quantization: QuantizationSection | None = Field(
        None, description="QLoRA: load the frozen base weights quantized through bitsandbytes (needs a CUDA GPU; "
        "refused on CPU)")


def _one_or_many_schema(schema: dict[str, Any]) -> None:
    """The JSON Schema of ``train``/``eval`` says what ``_one_or_many`` accepts: a path or a list."""
    for key in ("train", "eval"):
        prop = schema["properties"][key]
        meta = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        schema["properties"][key] = {"anyOf": [{"type": "string"}, prop], **meta}


class LongDocumentUpsamplingSection(_Strict):
    """Per-source length upsampling (Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K
    Context"): within each training file, long documents are drawn more often, while each file keeps its
    share of the training tokens. Uses the tokenized-corpus cache (see data.cache_dir)."""

    enabled: bool = Field(False, description="upsample long documents in the training windows")
    min_length: int | None = Field(None, gt=0, description="documents of at least this many tokens are long; "
                                   "default: the stage's length")
    factor: float = Field(3.0, ge=1, description="weight of a long document's tokens relative to the other "
                          "tokens of its file (1: no upsampling)")


class DataSection(_Strict):
    """Training text and held-out text."""

    model_config = ConfigDict(json_schema_extra=_one_or_many_schema)

    train: list[str] = Field(..., min_length=1, description="one path or a list: jsonl/json/txt/parquet/csv files "
                             "or a saved datasets folder")
    eval: list[str] = Field(default_factory=list, description="held-out data (one path or a list); defaults to a "
                            "split of train")
    text_field: str = Field("text", description="the field that holds the text in .jsonl/.json/.parquet/.csv rows")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="share of the training documents held out when "
                                 "data.eval is empty")
    synthetic_passkey_share: float = Field(
        0.0, ge=0, le=1, description="fraction of training rows that are passkey retrieval examples"
    )
    packing: bool = Field(False, description="pack the variable-length passkey examples several to a row "
                          "(position ids restart per example, no attention across them) instead of padding")
    cache_dir: str | None = Field(
        None, description="folder of the tokenized-corpus cache (relative: to the current directory). Training "
        "then reads flat memory-mapped token arrays, tokenized once per (tokenizer, file bytes), with windows "
        "that respect document boundaries. Unset, the cache is used only when a training input is larger than "
        "64 MiB or long_document_upsampling is on, in <run.output_dir>/.cache/tokens; otherwise (e.g. the demo) "
        "the corpus is tokenized in memory and windows are random slices of the joined documents")
    num_proc: int | None = Field(None, ge=1, description="processes that tokenize the corpus into the cache; "
                                 "default: min(4, CPU cores)")
    long_document_upsampling: LongDocumentUpsamplingSection = Field(default_factory=LongDocumentUpsamplingSection)

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class LoraSection(_Strict):
    """PEFT LoRA adapters (strategy lora)."""

    rank: int = Field(16, ge=1, le=4096, description="LoRA rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA scale numerator: updates are scaled by alpha/r "
                         "(alpha/sqrt(r) with use_rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt; all-linear: q/k/v/o and gate/up/down projections")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r) (rsLoRA, Kalajdzievski 2023)")
    use_dora: bool = Field(False, description="weight-decomposed adapters (DoRA, Liu et al. 2024)")
    modules_to_save: list[str] = Field(default_factory=list, description="e.g. norms / embeddings (LongLoRA)")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="per-module ranks (PEFT rank_pattern)")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="per-module alphas (PEFT)")


class BlockExpansionSection(_Strict):
    """LLaMA Pro style growth: new identity-initialised decoder blocks, old blocks frozen."""

    new_blocks: int = Field(1, ge=1, description="decoder blocks to insert (at most one per original block)")
    train_norms: bool = Field(False, description="also train every normalisation layer")
    train_embeddings: bool = Field(False, description="also train the input embeddings and the output head")


class ScalingSection(_Strict):
    """How the model gains trainable capacity."""

    strategy: str = Field("lora", description="lora | block_expansion | full | a plugin strategy (entry points)")
    lora: LoraSection = Field(default_factory=LoraSection)
    block_expansion: BlockExpansionSection = Field(default_factory=BlockExpansionSection)
    options: dict[str, Any] = Field(default_factory=dict, description="options of a plugin strategy")


class ContextSection(_Strict):
    """The context to reach, the method that extends it, and the probe-gated stages on the way."""

    target_length: int = Field(..., gt=0, description="the context length to reach, in tokens")
    base_length: int | None = Field(None, gt=0, description="defaults to the model's max_position_embeddings")
    method: str = Field("yarn", description="context-extension method applied at each stage (rewrites the position "
                        "encoding's config: RoPE parameters, ALiBi or learned-table length)")
    method_params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters (yarn: "
                                          "beta_fast, beta_slow, attention_factor; llama3: low_freq_factor, "
                                          "high_freq_factor; longrope: short_factor, long_factor; learned_table: "
                                          "mode, tail); checked by validate")
    schedule: list[int] | None = Field(None, description="explicit stage lengths; default doubles up to target")
    gate_policy: Literal["extend", "stop", "rollback", "continue"] = Field(
        "extend", description="a failed stage gate: extend trains the stage once more, rollback retries it from its "
        "start with a lower learning rate (both then end the run at the last stage that passed), stop ends it "
        "there at once, continue goes on (the verdict stays gates failed)")
    pose: bool = Field(False, description="positional skip-wise training (PoSE, Zhu et al. 2023): train each "
                       "stage on base-length windows whose position ids skip up to the stage length")
    pose_chunks: int = Field(2, ge=2, le=16, description="chunks per PoSE window (each after the first skips)")
    manual_gates: bool = Field(False, description="wait for an operator's approve (cockpit / control.jsonl) "
                               "before each next stage")
    manual_gate_timeout_s: float | None = Field(None, gt=0, description="give up waiting (run halted); None: wait")


class TrainingSection(_Strict):
    """The optimizer and the training steps of each stage."""

    steps_per_stage: int | list[int] = Field(60, description="one budget for every stage, or one per stage")
    micro_batch_size: int = Field(4, ge=1, description="rows per forward pass (per process)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(5, ge=0, description="linear warm-up steps of the learning-rate schedule")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after the warm-up (transformers' scheduler names)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this global norm")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less "
                                         "memory, slower steps")
    logging_steps: int = Field(5, ge=1, description="optimizer steps between logged training metrics")
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
    sharding: Literal["none", "fsdp2"] = Field(
        "none", description="under a multi-process launch: none (DDP: every process holds the whole model) or "
        "fsdp2 (torch FSDP2: each decoder block and the root sharded over the processes, sharded snapshots)")
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
    """Synthetic passkey retrieval (a number hidden in filler text) at each stage length."""

    enabled: bool = Field(True, description="run the probe (and its gate)")
    trials: int = Field(50, ge=1, description="trials per length, spread evenly over depths")
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                description="where the passkey sits, as a fraction of the context (0: start, 1: end)")
    seed: int = Field(4242, description="seed of the trials: the same trials at every stage")
    min_accuracy: float = Field(0.8, ge=0, le=1, description="stage gate")
    min_depth_accuracy: float | None = Field(
        None, ge=0, le=1, description="stage gate on the worst depth's accuracy (a model that retrieves "
        "only near the ends of its window can still average above min_accuracy); null: not gated")
    heldout_template: bool = Field(True, description="also score a held-out needle wording that no training row "
                                   "and no gate uses (reported as passkey_heldout_template, not gated)")


class PerplexityProbeSection(_Strict):
    """Held-out perplexity at each stage length."""

    enabled: bool = Field(True, description="run the probe (and its gate)")
    windows: int = Field(16, ge=1, description="non-overlapping windows of held-out text per length")
    max_ratio_to_base: float = Field(
        1.25, gt=0, description="stage gate: ppl at stage length / base ppl at base length"
    )


class ShortContextProbeSection(_Strict):
    """Held-out perplexity at the base length: what the extension costs the short context."""

    enabled: bool = Field(True, description="run the probe (and its gate)")
    max_regression_pct: float = Field(10.0, ge=0, description="stage gate on ppl at base length vs base model")


class CustomProbeSection(_Strict):
    """An extra probe run after each stage (its figures are logged as probe/<name>/... metrics)."""

    name: str = Field(..., description="a probe from the scaler_wizard.probes entry points or probe_dirs")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the probe class")


class LmEvalSection(_Strict):
    """lm-evaluation-harness tasks run in-process on the live model after each stage (needs the lm-eval
    extra); figures lm_eval/<task>/<metric>@<length>. Offline only: RULER's niah_single_1,
    niah_multikey_2, niah_multikey_3, ruler_cwe, ruler_fwe and ruler_vt generate their data locally."""

    tasks: list[str] = Field(..., min_length=1, description="lm-eval task (or group) names, e.g. niah_single_1")
    limit: int | None = Field(None, ge=1, description="examples per task and length; None: all")
    lengths: list[Annotated[int, Field(gt=0)]] | None = Field(
        None, description="lengths to evaluate at (the model's max_length there, and RULER's max_seq_lengths); "
        "each stage evaluates those up to its own length; None: the stage's length")
    batch_size: int = Field(1, ge=1, description="lm-eval's batch size")
    min_scores: dict[str, float] = Field(
        default_factory=dict, description="stage gate: '<task>/<metric>' (e.g. niah_single_1/score, "
        "hellaswag/acc) -> minimum at every evaluated length")

    @field_validator("min_scores")
    @classmethod
    def _task_slash_metric(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k in v if k.count("/") != 1 or not all(k.split("/"))]
        if bad:
            raise ValueError(f"keys must be '<task>/<metric>' (e.g. niah_single_1/score), not {', '.join(bad)}")
        return v


class EvaluationSection(_Strict):
    """Probes run on the base model and after each stage; their thresholds are the stage gates."""

    probe_dirs: list[str] = Field(default_factory=list, description="folders of drop-in probe files (*.py)")
    custom: list[CustomProbeSection] = Field(default_factory=list, description="extra probes run after each stage")
    passkey: PasskeyProbeSection = Field(default_factory=PasskeyProbeSection)
    perplexity: PerplexityProbeSection = Field(default_factory=PerplexityProbeSection)
    short_context: ShortContextProbeSection = Field(default_factory=ShortContextProbeSection)
    evaluate_base_at: list[int] | None = Field(None, description="lengths to probe the base model at")
    probe_batch_size: int = Field(4, ge=1, description="most rows per probe forward (fewer when the memory budget "
                                  "says so)")
    probe_memory_gb: float | None = Field(None, gt=0, description="memory budget of one probe forward; default: 70% "
                                          "of available RAM, or 90% of free GPU memory plus PyTorch's cache")
    lm_eval: LmEvalSection | None = Field(None, description="lm-evaluation-harness tasks as stage probes and gates "
                                          "(docs/evaluation.md)")


class DistillationSection(_Strict):
    """Knowledge preservation: ``(1-kd_weight)*CE + kd_weight*T^2*KD`` against a teacher."""

    enabled: bool = Field(False, description="add the distillation term to the training loss")
    teacher: Literal["base", "model", "offline"] = Field(
        "base", description="base: the student's own frozen weights, adapters off, original positions"
    )
    teacher_path: str | None = Field(None, description="model folder for teacher: model")
    cache: str | None = Field(None, description="offline top-k cache folder (scaler-wizard distill cache)")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher); "
        "jsd: generalised Jensen-Shannon with weight beta")
    beta: float = Field(0.5, ge=0, le=1, description="JSD(beta) mixing weight")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of teacher and student")
    kd_weight: float = Field(0.5, ge=0, le=1, description="weight of the distillation term (formula above)")
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
    """Where metrics go besides the run's own metrics.jsonl."""

    remote: RemoteSinkConfig = Field(default_factory=RemoteSinkConfig)
    mirrors: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="also report the Trainer's logs there (transformers' report_to; "
        "the package must be installed); metrics.jsonl stays the record")


class OutputSection(_Strict):
    """What the run saves at its end (the adapter, for LoRA, is always saved)."""

    merge: bool = Field(True, description="also save merged weights in model/")
    save_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the saved weights")


class Recipe(_Strict):
    recipe_version: Literal[1] = Field(1, description="the recipe format's version")
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
        if self.scaling.strategy == "full" and self.distillation.enabled and self.distillation.teacher == "base":
            # the base teacher is the student with its new capacity switched off (no second copy
            # of the weights); full fine-tuning leaves nothing of the base to switch back to
            raise ValueError("distillation.teacher 'base' cannot be used with scaling.strategy 'full': set "
                             "distillation.teacher: model and distillation.teacher_path to the base model folder "
                             "(or teacher: offline, or distillation.enabled: false)")
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
