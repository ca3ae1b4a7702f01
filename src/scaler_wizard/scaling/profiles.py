"""Profile Recommender: a use-case template + a model + a hardware profile -> a runnable recipe.

Each use case is a shipped template (``scaler_wizard/templates/<use_case>.yaml``, itself a valid
recipe) and a few planning defaults (:data:`USE_CASES`). :func:`recommend` adapts the template:

1. precision for the device (bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU/MPS);
2. LoRA rank/alpha/dropout/targets from the Adaptive Rank Resolver at the use case's capacity;
3. memory: if the step at the target context does not fit the training budget, in this order:
   gradient checkpointing on, micro-batch halved (accumulation doubled, same effective batch),
   4-bit QLoRA where CUDA and bitsandbytes are present (recorded as a recommendation while the
   recipe has no quantisation field), then the target context capped to the longest that fits;

every change is an :class:`Adjustment` with its reason, written as comments atop the recipe, and
the written file is validated with ``recipe.load_recipe``. Pure except for reading and writing files.

Data. The templates train on the embedded demo data; a written recipe never does unless asked
(``data=['builtin:demo/train.jsonl']``): ``data`` / ``eval_data`` (``plan --data`` /
``--eval-data``) name the user's files, and without them ``data.train`` is written empty, with a
comment saying what to fill in, so ``scaler-wizard validate`` and ``run`` refuse the recipe until
it names real data (everything else in it is validated before writing).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError, ModelLoadError, PlanError
from ..recipe import ModelSection, Recipe, load_recipe, parse_recipe, resolve_path
from .hardware import HardwareProfile
from .memory import GiB, MemoryRequest, ModelDims, estimate_memory, max_seq_len, read_model_dims
from .rank_resolver import ResolvedPlan, minimum_capacity, resolve_plan
from .strategies import get_strategy


@dataclass(frozen=True)
class UseCase:
    capacity: float  # trainable fraction of the base parameters (see rank_resolver)
    context_multiplier: int  # default target context = multiplier x the model's base context
    description: str


USE_CASES: dict[str, UseCase] = {
    "chat": UseCase(0.005, 2, "chat / instruction following: modest capacity, 2x context"),
    "long_context": UseCase(0.005, 8, "long documents: progressive YaRN stages to 8x, LoRA + trainable norms"),
    "code": UseCase(0.01, 4, "code: more capacity, 4x context for whole files"),
    "reasoning": UseCase(0.01, 4, "reasoning: more capacity, 4x context for long chains of thought"),
    "budget": UseCase(0.002, 2, "small hardware: smallest adapter, micro-batch 1, QLoRA where possible"),
}
LOSS_CHUNK = 512  # the stage trainer's chunked cross-entropy (training/stage_trainer.py)
CONTEXT_GRANULE = 256


@dataclass(frozen=True)
class Adjustment:
    field: str
    before: Any
    after: Any
    reason: str

    def line(self) -> str:
        return f"{self.field}: {self.before!r} -> {self.after!r}: {self.reason}"


@dataclass
class Recommendation:
    use_case: str
    recipe: dict[str, Any]
    adjustments: list[Adjustment]
    plan: ResolvedPlan
    base_length: int
    target_length: int
    notes: list[str] = field(default_factory=list)

    @property
    def missing_data(self) -> bool:
        """True when no training data was given: ``data.train`` is written empty."""
        return not self.recipe.get("data", {}).get("train")

    def header(self) -> str:
        mem = self.plan.memory
        lines = [f"Written by `scaler-wizard plan` for use case '{self.use_case}' ({USE_CASES[self.use_case].description}).",
                 f"Model {self.recipe['model']['path']}: base context {self.base_length}, target {self.target_length}.",
                 (f"Estimated peak memory {mem.total / GiB:.2f} GiB "
                  f"({', '.join(f'{k} {v}' for k, v in mem.breakdown_gb().items() if k != 'total')} GiB); "
                  f"training step {mem.step_total / GiB:.2f} GiB, probes at {self.target_length} tokens "
                  f"{mem.probe_total / GiB:.2f} GiB, merged export {mem.export_total / GiB:.2f} GiB."),
                 "Adjustments:"]
        lines += [f"  - {a.line()}" for a in self.adjustments] or ["  (none)"]
        lines += [f"Note: {n}" for n in self.notes]
        if self.missing_data:
            lines += ["", MISSING_DATA_COMMENT,
                      "`scaler-wizard validate` and `run` refuse this recipe until data.train names your files."]
        return "".join(f"# {line}\n" if line else "#\n" for line in lines)


MISSING_DATA_COMMENT = ("TODO data.train is empty: list your training files there (jsonl/json/txt/parquet or a saved "
                        "datasets folder; data.eval for held-out data), or re-run `scaler-wizard plan` with --data FILE "
                        "[--eval-data FILE].")


def _data_paths(paths: list[str] | None, option: str) -> list[str]:
    """Absolute paths (so the recipe works from any folder) of files that exist; ``builtin:`` kept."""
    out = []
    for raw in paths or []:
        if raw.startswith("builtin:"):
            resolved = resolve_path(raw)
            if not resolved.exists():
                raise DataError(f"{option} {raw}: no such embedded file ({resolved}).")
            out.append(raw)
            continue
        p = Path(raw).expanduser()
        if not p.exists():
            raise DataError(f"{option} {raw}: no such file or folder.",
                            hint="Pass jsonl/json/txt/parquet files or a saved datasets folder.")
        out.append(str(p.resolve()))
    return out


def template_path(use_case: str) -> Path:
    if use_case not in USE_CASES:
        raise PlanError(f"Unknown use case {use_case!r}; choose one of {', '.join(USE_CASES)}.")
    return Path(str(resources.files("scaler_wizard") / "templates" / f"{use_case}.yaml"))


def load_template(use_case: str) -> dict[str, Any]:
    return yaml.safe_load(template_path(use_case).read_text(encoding="utf-8"))


def model_dims_for(model: str) -> tuple[ModelDims, Path]:
    """``model`` is a folder with config.json, a config.json file, or a ``builtin:`` path."""
    path = resolve_path(model)
    if model == "builtin:demo" and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"The embedded demo model is not built yet ({path} has no config.json).",
            hint="Run scripts/build_demo_model.py, or pass --model with a model folder.",
        )
    return read_model_dims(path), path


def _precision(hw: HardwareProfile | None) -> tuple[str, str]:
    if hw is None:
        return "float32", "hardware unknown: float32 runs everywhere"
    if hw.accelerator == "cuda":
        if hw.supports_bf16():
            return "bfloat16", "the GPUs support bf16: half the memory of fp32 without fp16's overflow"
        return "float16", "GPU without (known) bf16 support: fp16 mixed precision"
    if hw.accelerator == "mps":
        return "float32", "Apple MPS: float32 (mixed precision training on MPS is incomplete)"
    return "float32", "CPU: float32 (bf16 matmuls are slow on most CPUs)"


def _set(recipe: dict, path: str, value: Any, reason: str, adjustments: list[Adjustment]) -> None:
    *parents, leaf = path.split(".")
    node = recipe
    for p in parents:
        node = node.setdefault(p, {})
    before = node.get(leaf)
    if before != value:
        node[leaf] = value
        adjustments.append(Adjustment(path, before, value, reason))


def _adapt_template(recipe: dict, adj: list[Adjustment], uc: UseCase, model: str,
                    hardware: HardwareProfile | None, target_context: int | None, data: list[str] | None,
                    eval_data: list[str] | None, base_length: int | None) -> tuple[ModelDims, int, int, str]:
    """The template's model, data, context and precision for this model and machine; returns
    (model dimensions, base length, target length, dtype). Memory is not looked at yet."""
    train_files, eval_files = _data_paths(data, "--data"), _data_paths(eval_data, "--eval-data")
    if eval_files and not train_files:
        raise DataError("--eval-data was given without --data.", hint="Pass the training files with --data FILE.")
    dims, _ = model_dims_for(model)
    if not dims.max_position_embeddings:
        raise ModelLoadError(f"{model}: config.json has no max_position_embeddings; the base context is unknown.")
    base = dims.max_position_embeddings
    if base_length is not None and not 0 < base_length <= base:
        raise PlanError(f"base length {base_length} must be between 1 and the model's max_position_embeddings {base}.",
                        hint=f"Pass --base-length up to {base}, or leave it out.")
    written_path = model if model.startswith("builtin:") else str(resolve_path(model).resolve())
    _set(recipe, "model.path", written_path, "the model you asked for", adj)
    if base_length is not None:
        base = base_length
        _set(recipe, "context.base_length", base_length, "--base-length (below the model's "
             f"{dims.max_position_embeddings})", adj)
    # never the template's demo data: the user's files, or an empty list that validation refuses
    recipe.setdefault("data", {}).pop("eval", None)
    _set(recipe, "data.train", train_files, "--data" if train_files else "no --data given: fill in your files", adj)
    if eval_files:
        _set(recipe, "data.eval", eval_files, "--eval-data", adj)
    target = target_context or uc.context_multiplier * base
    if target <= base:
        raise PlanError(f"target context {target} must exceed the model's base context {base}.",
                        hint=f"Pass --target-context above {base}.")
    _set(recipe, "context.target_length", target,
         "requested" if target_context else f"{uc.context_multiplier}x the base context {base}", adj)
    dtype, why = _precision(hardware)
    _set(recipe, "model.dtype", dtype, why, adj)
    if hardware is not None and hardware.accelerator == "cuda" and dims.max_position_embeddings:
        _set(recipe, "model.attn_implementation", "sdpa", "SDPA dispatches to FlashAttention kernels on CUDA", adj)
    return dims, base, target, dtype


def recommend(
    use_case: str,
    model: str,
    hardware: HardwareProfile | None,
    *,
    target_context: int | None = None,
    capacity: float | None = None,
    dataset_tokens: int | None = None,
    data: list[str] | None = None,
    eval_data: list[str] | None = None,
    base_length: int | None = None,
) -> Recommendation:
    """Adapt the use case's template to the model and hardware (see the module docstring).
    ``data`` / ``eval_data``: the training and held-out files; without ``data`` the recipe's
    ``data.train`` is empty (see :attr:`Recommendation.missing_data`). ``base_length``: treat the
    model as trained to this many tokens (``context.base_length``; at most its
    ``max_position_embeddings``), e.g. to extend a short window of a model for a quick test."""
    uc = USE_CASES.get(use_case)
    if uc is None:
        raise PlanError(f"Unknown use case {use_case!r}; choose one of {', '.join(USE_CASES)}.")
    recipe, adj, notes = load_template(use_case), [], []
    dims, base, target, dtype = _adapt_template(recipe, adj, uc, model, hardware, target_context, data, eval_data,
                                                base_length)

    t = recipe["training"]
    req = MemoryRequest(
        seq_len=target, micro_batch=t["micro_batch_size"], dtype=dtype,
        gradient_checkpointing=t.get("gradient_checkpointing", False),
        attn_implementation=recipe["model"].get("attn_implementation", "sdpa"), loss_chunk=LOSS_CHUNK,
        backend=hardware.accelerator if hardware else "cuda",
    )
    if capacity is None:
        capacity = uc.capacity
        floor = minimum_capacity(dims)
        if capacity < floor:
            # a tiny model: the use case's fraction buys less than one rank
            capacity = math.ceil(floor * 1e6) / 1e6
            notes.append(f"capacity raised from the use case's {uc.capacity:g} to {capacity:g}: the smallest "
                         "LoRA plan for this small model")
    # the adapter first (memory-independent), so the fitting below plans with the adapter we write
    unchecked = resolve_plan(dims, capacity, dataset_tokens=dataset_tokens, request=req)
    lora_opts = {**recipe["scaling"]["lora"], **{k: unchecked.options[k] for k in
                                                 ("rank", "alpha", "dropout", "target_modules", "use_rslora")}}
    budget = hardware.training_budget_bytes() if hardware else None
    if budget is None:
        notes.append("memory budget unknown: the plan was not checked against memory; pass --hardware FILE")
    req, target = _fit(dims, lora_opts, req, budget, hardware, recipe, base, adj, notes)
    plan = resolve_plan(dims, capacity, dataset_tokens=dataset_tokens, hardware=hardware, request=req)
    modules_to_save = lora_opts.get("modules_to_save", [])
    for key in ("rank", "alpha", "dropout", "target_modules", "use_rslora"):
        _set(recipe, f"scaling.lora.{key}", plan.options[key], "resolver: " + plan.reasons[key], adj)
    if modules_to_save:
        recipe["scaling"]["lora"]["modules_to_save"] = modules_to_save
    return Recommendation(use_case, recipe, adj, plan, base, target, notes + list(plan.notes))


def _fits(dims: ModelDims, lora_opts: dict, req: MemoryRequest, budget: float | None) -> bool:
    if budget is None:
        return True
    plan = get_strategy("lora").plan(dims, lora_opts)
    return estimate_memory(dims, plan, req).total <= budget


def _fit(dims, lora_opts, req, budget, hardware, recipe, base, adj, notes) -> tuple[MemoryRequest, int]:
    """Apply the memory adjustments in order until the step at the target context fits."""
    if _fits(dims, lora_opts, req, budget):
        return req, req.seq_len
    if not req.gradient_checkpointing:
        req = replace(req, gradient_checkpointing=True)
        _set(recipe, "training.gradient_checkpointing", True,
             "the step does not fit without recomputation (keeps one layer's activations at a time)", adj)
    t = recipe["training"]
    while not _fits(dims, lora_opts, req, budget) and req.micro_batch > 1:
        mb = req.micro_batch // 2
        req = replace(req, micro_batch=mb)
        _set(recipe, "training.micro_batch_size", mb, "halved until the step fits", adj)
        _set(recipe, "training.gradient_accumulation_steps", t["gradient_accumulation_steps"] * 2,
             "doubled with the micro-batch halving: same effective batch", adj)
    if not _fits(dims, lora_opts, req, budget) and hardware is not None and hardware.can_qlora():
        quantised = replace(req, quantization="4bit", dtype="bfloat16" if hardware.supports_bf16() else "float16")
        if "quantization" in ModelSection.model_fields:
            req = quantised
            _set(recipe, "model.quantization", "4bit", "4-bit QLoRA: CUDA and bitsandbytes are present", adj)
        else:
            # never write a recipe that only fits with a setting it cannot express
            qlora_len = max_seq_len(dims, get_strategy("lora").plan(dims, lora_opts), quantised, budget,
                                    multiple_of=CONTEXT_GRANULE)
            notes.append(f"4-bit QLoRA (CUDA + bitsandbytes present) would fit {min(qlora_len, req.seq_len)} "
                         "tokens, but this recipe schema has no quantisation field yet; planned without it")
    if not _fits(dims, lora_opts, req, budget):
        longest = max_seq_len(dims, get_strategy("lora").plan(dims, lora_opts), req, budget,
                              multiple_of=CONTEXT_GRANULE)
        if longest <= base:
            qlora = req.quantization == "4bit"
            raise PlanError(
                f"Even {base} tokens (the base context) at micro-batch 1 with checkpointing"
                f"{' and 4-bit QLoRA' if qlora else ''} do not fit the {budget / GiB:.1f} GiB training budget "
                f"of this {hardware.accelerator} machine.",
                hint="Use a smaller model or a larger machine" + ("." if qlora else ", or QLoRA on a CUDA GPU "
                                                                  "with bitsandbytes installed."),
            )
        _set(recipe, "context.target_length", longest,
             f"capped: {longest} tokens is the longest that fits {budget / GiB:.1f} GiB", adj)
        req = replace(req, seq_len=longest)
    return req, req.seq_len


def write_recommendation(rec: Recommendation, output: str | Path) -> Recipe | None:
    """Write the recipe (adjustments as header comments) and validate the written file.

    Without training data (:attr:`Recommendation.missing_data`) everything else is validated
    (with a stand-in for ``data.train``), the file is written with ``data.train: []`` and a
    comment saying what to fill in, and None is returned: that file fails validation until edited."""
    out = Path(output)
    checked = rec.recipe
    if rec.missing_data:
        checked = {**rec.recipe, "data": {**rec.recipe.get("data", {}), "train": ["your-training-data.jsonl"]}}
    parse_recipe(checked, str(out))  # fail before writing anything invalid
    out.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(rec.recipe, sort_keys=False, default_flow_style=False)
    if rec.missing_data:
        body = re.sub(r"^(\s+)train: \[\]$", lambda m: f"{m.group(1)}# {MISSING_DATA_COMMENT}\n{m.group(0)}",
                      body, count=1, flags=re.MULTILINE)
    out.write_text(rec.header() + body, encoding="utf-8")
    if rec.missing_data:
        return None
    recipe, _ = load_recipe(out)
    return recipe
