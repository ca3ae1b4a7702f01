"""Adaptive Rank Resolver: from a model, a capacity target, the data and the hardware to a
complete LoRA or block-expansion plan, with the reason for every value.

**Capacity target** (``capacity``): the number of *trainable* parameters as a fraction of the base
model's parameter count ``N`` (``ModelDims.n_params()``, embeddings included). ``0.01`` means
"train 1% of N": for Llama-3.1-8B (N = 8.03e9) that is 80M parameters, i.e. LoRA rank 32 on all
linear layers (2.6M parameters per rank step). For block expansion the same number is the growth:
the model gains ``capacity · N`` parameters as whole decoder blocks (LLaMA Pro added 8 blocks to
Llama 2 7B's 32, a capacity of 0.25), so the grown model has ``(1 + capacity) · N`` parameters.
It must satisfy ``0 < capacity <= 1``.

The resolver is pure and deterministic (no torch, no clock, no randomness); the optional
calibration (:func:`measure_sensitivity`) needs a model and runs a few backward passes. It never
returns a plan that :func:`memory.estimate_memory` says will not fit the hardware's training
budget; when the budget is unknown the plan says so instead of assuming one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..errors import PlanError
from .hardware import HardwareProfile
from .memory import (
    ALL_LINEAR,
    ATTENTION_MODULES,
    GiB,
    MemoryEstimate,
    MemoryRequest,
    ModelDims,
    StrategyPlan,
    estimate_memory,
    lora_params,
    module_names,
    trainable_params,
)

# Fallback targets when the budget cannot give every linear layer a rank of at least MIN_USEFUL_RANK:
# all linear layers (QLoRA, Dettmers et al. 2023: needed to match full fine-tuning) ->
# attention only -> q and v (the original LoRA paper, Hu et al. 2021).
TARGET_LADDER: tuple[tuple[str, ...], ...] = (ALL_LINEAR, ATTENTION_MODULES, ("q_proj", "v_proj"))
MIN_USEFUL_RANK = 4
RSLORA_FROM_RANK = 64  # rsLoRA (Kalajdzievski 2023): alpha/r scaling slows learning at high ranks
RSLORA_ALPHA = 16.0  # scale 16/sqrt(r) = 2.0 at r = 64, continuous with alpha = 2r below


@dataclass(frozen=True)
class ResolvedPlan:
    """The resolver's answer. ``options`` are the strategy's options (``strategies.get_strategy``)."""

    strategy: Literal["lora", "block_expansion"]
    options: dict[str, Any]
    reasons: dict[str, str]
    base_params: int
    trainable_params: int
    capacity_target: float
    memory: MemoryEstimate
    memory_budget_bytes: float | None
    request: MemoryRequest
    notes: tuple[str, ...] = ()

    @property
    def capacity_used(self) -> float:
        return self.trainable_params / self.base_params

    @property
    def fits(self) -> bool | None:
        return self.memory.fits(self.memory_budget_bytes)

    def to_lora_config(self) -> Any:
        if self.strategy != "lora":
            raise PlanError("This plan grows blocks; it has no LoraConfig.")
        from .strategies import LoraOptions

        return LoraOptions.model_validate(self.options).to_peft()

    def explain(self) -> list[tuple[str, str, str]]:
        """(field, value, reason) rows for ``scaler-wizard plan --explain``."""
        shown = {"memory": f"{self.memory.total / GiB:.2f} GiB"}
        return [(k, _show(self.options[k]) if k in self.options else shown.get(k, ""), r)
                for k, r in self.reasons.items()]

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "options": self.options, "reasons": self.reasons,
            "base_params": self.base_params, "trainable_params": self.trainable_params,
            "capacity_target": self.capacity_target, "capacity_used": round(self.capacity_used, 6),
            "memory_gb": self.memory.breakdown_gb(),
            "memory_budget_gb": None if self.memory_budget_bytes is None else round(self.memory_budget_bytes / GiB, 3),
            "fits": self.fits, "notes": list(self.notes),
        }


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    if isinstance(v, dict):
        return f"{len(v)} entries" if v else "{}"
    return str(v)


# ------------------------------------------------------------------------------------------
# Pure rules
# ------------------------------------------------------------------------------------------


def check_capacity(capacity: float) -> None:
    if not isinstance(capacity, (int, float)) or isinstance(capacity, bool) or not math.isfinite(capacity):
        raise PlanError(f"capacity must be a number (got {capacity!r}).")
    if not 0 < capacity <= 1:
        raise PlanError(
            f"capacity must satisfy 0 < capacity <= 1 (got {capacity}): it is the trainable parameters as a "
            "fraction of the base model's parameters.",
            hint="Typical LoRA values: 0.002-0.05; block expansion: 0.1-0.5.",
        )


def minimum_capacity(dims: ModelDims, strategy: Literal["lora", "block_expansion"] = "lora") -> float:
    """The smallest capacity that gives any plan: rank 1 on q_proj/v_proj, or one whole block."""
    smallest = lora_params(dims, 1, TARGET_LADDER[-1]) if strategy == "lora" else dims.block_params()
    return smallest / dims.n_params()


def rank_grid(max_rank: int) -> list[int]:
    """Ranks the resolver proposes: 1, 2, 4, then multiples of 8 (kernel-friendly) up to max_rank."""
    return [r for r in (1, 2, 4) if r <= max_rank] + list(range(8, max_rank + 1, 8))


def param_budget(dims: ModelDims, capacity: float, dataset_tokens: int | None) -> tuple[int, str]:
    budget = int(capacity * dims.n_params())
    why = f"capacity {capacity:g} x {dims.n_params():,} base parameters = {budget:,} trainable parameters"
    if dataset_tokens is not None:
        if dataset_tokens <= 0:
            raise PlanError(f"dataset_tokens must be positive (got {dataset_tokens}).")
        if dataset_tokens < budget:
            # Heuristic: more free parameters than training tokens lets the adapter memorise the data.
            budget = dataset_tokens
            why += f", capped at the {dataset_tokens:,} dataset tokens (at most one trainable parameter per token)"
    return budget, why


def choose_dropout(dataset_tokens: int | None) -> tuple[float, str]:
    if dataset_tokens is None:
        return 0.05, "dataset size unknown: 0.05, QLoRA's value for large models"
    if dataset_tokens < 1_000_000:
        return 0.1, f"{dataset_tokens:,} tokens is small data: 0.1 regularises (QLoRA used 0.1 up to 13B)"
    if dataset_tokens < 100_000_000:
        return 0.05, f"{dataset_tokens:,} tokens: 0.05 (QLoRA's value for 33B/65B)"
    return 0.0, f"{dataset_tokens:,} tokens is enough data that dropout only slows learning"


def choose_alpha(rank: int) -> tuple[float, bool, str]:
    if rank >= RSLORA_FROM_RANK:
        return RSLORA_ALPHA, True, (
            f"rank {rank} >= {RSLORA_FROM_RANK}: rsLoRA scaling alpha/sqrt(r) (Kalajdzievski 2023) with alpha "
            f"{RSLORA_ALPHA:g} gives scale {RSLORA_ALPHA / math.sqrt(rank):.2f}"
        )
    return float(2 * rank), False, "alpha = 2 x rank: a constant update scale alpha/r = 2 across ranks"


def _memory_budget(hardware: HardwareProfile | None) -> tuple[float | None, str]:
    if hardware is None:
        return None, "no hardware profile: memory not checked"
    budget = hardware.training_budget_bytes()
    if budget is None:
        return None, f"{hardware.accelerator} memory unknown: memory not checked (give a hardware profile)"
    return budget, f"{budget / GiB:.1f} GiB usable on {hardware.accelerator}"


def _request_for(request: MemoryRequest, hardware: HardwareProfile | None) -> MemoryRequest:
    return request if hardware is None else replace(request, backend=hardware.accelerator)


# ------------------------------------------------------------------------------------------
# The resolver
# ------------------------------------------------------------------------------------------


def resolve_plan(
    dims: ModelDims,
    capacity: float,
    *,
    strategy: Literal["lora", "block_expansion"] = "lora",
    dataset_tokens: int | None = None,
    hardware: HardwareProfile | None = None,
    request: MemoryRequest | None = None,
    min_rank: int = 1,
    max_rank: int = 256,
    sensitivities: Mapping[str, float] | None = None,
) -> ResolvedPlan:
    """Resolve a plan; deterministic for equal inputs.

    ``request`` describes the training step (length, batch, precision, checkpointing, ...); the
    default is one 4096-token sequence in bf16 with checkpointing and a chunked loss.
    ``sensitivities`` (from :func:`measure_sensitivity`) turn the uniform rank into a per-module
    ``rank_pattern`` / ``alpha_pattern`` spending the same parameter budget.
    """
    check_capacity(capacity)
    if not 1 <= min_rank <= max_rank:
        raise PlanError(f"Need 1 <= min_rank <= max_rank (got {min_rank}, {max_rank}).")
    req = _request_for(request or MemoryRequest(seq_len=4096), hardware)
    req.check()
    mem_budget, mem_why = _memory_budget(hardware)
    budget, budget_why = param_budget(dims, capacity, dataset_tokens)
    if strategy == "block_expansion":
        return _resolve_blocks(dims, capacity, budget, budget_why, req, mem_budget, mem_why, hardware)
    if strategy != "lora":
        raise PlanError(f"The rank resolver plans 'lora' or 'block_expansion', not {strategy!r}.")
    return _resolve_lora(dims, capacity, budget, budget_why, req, mem_budget, mem_why, dataset_tokens,
                         min_rank, max_rank, sensitivities)


def _resolve_lora(dims, capacity, budget, budget_why, req, mem_budget, mem_why, dataset_tokens,
                  min_rank, max_rank, sensitivities) -> ResolvedPlan:
    grid = [r for r in rank_grid(max_rank) if r >= min_rank] or [min_rank]
    targets, rank, target_why = None, None, ""
    for candidate in TARGET_LADDER:
        per_rank = lora_params(dims, 1, candidate)
        fitting = [r for r in grid if r * per_rank <= budget]
        if fitting and (fitting[-1] >= min(MIN_USEFUL_RANK, max_rank) or candidate == TARGET_LADDER[-1]):
            targets, rank = candidate, fitting[-1]
            break
    if targets is None:
        smallest = lora_params(dims, grid[0], TARGET_LADDER[-1])
        raise PlanError(
            f"A capacity of {capacity:g} ({budget:,} parameters) is below the smallest LoRA plan "
            f"(rank {grid[0]} on q_proj/v_proj = {smallest:,} parameters).",
            hint=f"Raise capacity to at least {smallest / dims.n_params():.2g}.",
        )
    if targets == ALL_LINEAR:
        target_why = "all linear layers: QLoRA (Dettmers et al. 2023) needs them all to match full fine-tuning"
    else:
        target_why = (f"the budget gives all-linear LoRA a rank below {MIN_USEFUL_RANK}; fewer modules at a "
                      f"useful rank instead ({', '.join(targets)})")
    dropout, dropout_why = choose_dropout(dataset_tokens)

    def plan_at(r: int) -> StrategyPlan:
        return StrategyPlan(strategy="lora", lora_rank=r, lora_targets=targets, lora_dropout=dropout)

    rank_why = f"largest rank on the grid (1, 2, 4, multiples of 8) within {budget_why}"
    notes: list[str] = []
    estimate = estimate_memory(dims, plan_at(rank), req)
    if mem_budget is not None and estimate.total > mem_budget:
        lower = [r for r in grid if r < rank]
        while lower and estimate.total > mem_budget:
            rank = lower.pop()
            estimate = estimate_memory(dims, plan_at(rank), req)
        if estimate.total > mem_budget:
            raise _does_not_fit(dims, estimate, mem_budget, req, "LoRA")
        rank_why += f"; lowered to {rank} so the step fits {mem_budget / GiB:.1f} GiB"
    alpha, rslora, alpha_why = choose_alpha(rank)
    options: dict[str, Any] = {
        "rank": rank, "alpha": alpha, "dropout": dropout,
        "target_modules": "all-linear" if targets == ALL_LINEAR else list(targets),
        "use_rslora": rslora, "use_dora": False,
    }
    reasons = {
        "rank": rank_why, "alpha": alpha_why, "use_rslora": alpha_why if rslora else f"rank {rank} < {RSLORA_FROM_RANK}",
        "dropout": dropout_why, "target_modules": target_why,
        "use_dora": "off: DoRA adds ~30% step time for a small gain; enable it by hand if you want it",
        "memory": f"{estimate.total / GiB:.2f} GiB estimated; {mem_why}",
    }
    n_train = lora_params(dims, rank, targets)
    if sensitivities:
        pattern, alpha_pattern = calibrate_rank_pattern(
            dims, sensitivities, n_train, targets, min_rank=min_rank, max_rank=max_rank, alpha_per_rank=alpha / rank,
            rslora=rslora,
        )
        calibrated = StrategyPlan(strategy="lora", lora_rank=rank, lora_targets=targets, lora_dropout=dropout,
                                  rank_pattern=pattern)
        cal_est = estimate_memory(dims, calibrated, req)
        if mem_budget is None or cal_est.total <= mem_budget:
            options["rank_pattern"], options["alpha_pattern"] = pattern, alpha_pattern
            reasons["rank_pattern"] = (f"gradient sensitivity |W * dL/dW| per module (AdaLoRA's importance, Zhang "
                                       f"et al. 2023) shares the same {n_train:,} parameters, ranks in "
                                       f"[{min_rank}, {max_rank}]")
            reasons["alpha_pattern"] = "keeps each module's update scale equal to the uniform plan's"
            n_train, estimate = trainable_params(dims, calibrated), cal_est
        else:
            notes.append("calibrated ranks would not fit memory; kept the uniform rank")
    return ResolvedPlan("lora", options, reasons, dims.n_params(), n_train, capacity, estimate, mem_budget, req,
                        tuple(notes) + estimate.notes)


def _resolve_blocks(dims, capacity, budget, budget_why, req, mem_budget, mem_why, hardware) -> ResolvedPlan:
    per_block = dims.block_params()
    blocks = min(budget // per_block, dims.num_layers)
    if blocks < 1:
        raise PlanError(
            f"A capacity of {capacity:g} ({budget:,} parameters) is less than one decoder block ({per_block:,}).",
            hint=f"Raise capacity to at least {per_block / dims.n_params():.3g}, or use the lora strategy.",
        )
    why = f"whole blocks of {per_block:,} parameters within {budget_why}"
    if blocks == dims.num_layers and budget // per_block > dims.num_layers:
        why += f"; capped at one new block per original block ({dims.num_layers})"

    def plan_at(n: int) -> StrategyPlan:
        return StrategyPlan(strategy="block_expansion", new_blocks=n)

    estimate = estimate_memory(dims, plan_at(blocks), req)
    while mem_budget is not None and estimate.total > mem_budget and blocks > 1:
        blocks -= 1
        estimate = estimate_memory(dims, plan_at(blocks), req)
    if mem_budget is not None and estimate.total > mem_budget:
        raise _does_not_fit(dims, estimate, mem_budget, req, "block expansion")
    if mem_budget is not None and blocks < min(budget // per_block, dims.num_layers):
        why += f"; lowered to {blocks} so the step fits {mem_budget / GiB:.1f} GiB"
    from .strategies import insertion_points

    options = {"new_blocks": int(blocks), "train_norms": False, "train_embeddings": False}
    reasons = {
        "new_blocks": why,
        "insert_after": "after blocks " + ", ".join(map(str, insertion_points(dims.num_layers, blocks)))
        + " (LLaMA Pro: one new block closing each equal group)",
        "train_norms": "off: the old blocks and their norms stay frozen so the base model's skills are kept",
        "train_embeddings": "off: only needed when the vocabulary changes",
        "memory": f"{estimate.total / GiB:.2f} GiB estimated; {mem_why}",
    }
    return ResolvedPlan("block_expansion", options, reasons, dims.n_params(), int(blocks) * per_block, capacity,
                        estimate, mem_budget, req, estimate.notes)


def _does_not_fit(dims: ModelDims, est: MemoryEstimate, budget: float, req: MemoryRequest, what: str) -> PlanError:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in est.breakdown_gb().items() if k != "total")
    advice = []
    if not req.gradient_checkpointing:
        advice.append("enable gradient checkpointing")
    if req.loss_chunk is None:
        advice.append("use the chunked loss")
    if req.micro_batch > 1:
        advice.append("lower the micro-batch")
    if req.quantization == "none" and what == "LoRA":
        advice.append("use 4-bit QLoRA (CUDA + bitsandbytes)")
    advice.append(f"shorten the sequence below {req.seq_len}")
    return PlanError(
        f"No {what} plan for {dims.name} at {req.seq_len} tokens x {req.micro_batch} fits {budget / GiB:.1f} GiB: "
        f"even the smallest needs {est.total / GiB:.2f} GiB ({parts} GiB).",
        hint="To fit: " + "; ".join(advice) + ".",
    )


# ------------------------------------------------------------------------------------------
# Calibration: per-module ranks from gradient sensitivity
# ------------------------------------------------------------------------------------------


def calibrate_rank_pattern(
    dims: ModelDims,
    sensitivities: Mapping[str, float],
    budget_params: int,
    targets: Iterable[str] = ALL_LINEAR,
    *,
    min_rank: int = 1,
    max_rank: int = 256,
    alpha_per_rank: float = 2.0,
    rslora: bool = False,
) -> tuple[dict[str, int], dict[str, float]]:
    """Share ``budget_params`` among the target modules in proportion to their sensitivity.

    Rank r_m = clamp(lambda * s_m, min_rank, max_rank) with lambda found by bisection so that
    sum r_m * (in_m + out_m) <= budget; the integer remainder is then handed out one rank at a
    time to the most sensitive modules that still fit, so the allocation uses the budget up to
    less than one rank step of the cheapest module. Keys are the modules' names
    (``model.layers.3.self_attn.q_proj``), usable as PEFT ``rank_pattern`` keys. Pure.
    """
    shapes = dims.linear_shapes()
    targets = tuple(targets)
    modules = [(full, sum(shapes[short])) for _, short, full in module_names(dims) if short in targets]
    if not modules:
        raise PlanError("No target modules to calibrate.")
    missing = [full for full, _ in modules if full not in sensitivities]
    if missing:
        raise PlanError(f"Sensitivity missing for {len(missing)} module(s), e.g. {missing[0]}.",
                        hint="Measure every target module (measure_sensitivity) before calibrating.")
    bad = [k for k, v in sensitivities.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)]
    if bad:
        raise PlanError(f"Sensitivities must be finite and >= 0; {bad[0]} is {sensitivities[bad[0]]!r}.")
    floor_cost = sum(min_rank * c for _, c in modules)
    if floor_cost > budget_params:
        raise PlanError(f"The budget ({budget_params:,}) is below min_rank {min_rank} on every module ({floor_cost:,}).")
    total_s = sum(sensitivities[f] for f, _ in modules)
    weights = {f: (sensitivities[f] / total_s if total_s > 0 else 1 / len(modules)) for f, _ in modules}

    def ranks_at(lam: float) -> dict[str, int]:
        return {f: int(min(max_rank, max(min_rank, math.floor(lam * weights[f])))) for f, _ in modules}

    def cost(ranks: Mapping[str, int]) -> int:
        return sum(ranks[f] * c for f, c in modules)

    lo, hi = 0.0, float(max_rank * len(modules) * 4 + 1)
    for _ in range(100):
        mid = (lo + hi) / 2
        if cost(ranks_at(mid)) <= budget_params:
            lo = mid
        else:
            hi = mid
    ranks = ranks_at(lo)
    # hand out what is left, most sensitive first (ties broken by name: deterministic)
    order = sorted(modules, key=lambda fc: (-weights[fc[0]], fc[0]))
    spare = budget_params - cost(ranks)
    progress = True
    while progress:
        progress = False
        for f, c in order:
            if ranks[f] < max_rank and c <= spare:
                ranks[f] += 1
                spare -= c
                progress = True
    if rslora:
        alpha = {f: RSLORA_ALPHA for f in ranks}
    else:
        alpha = {f: round(alpha_per_rank * r, 6) for f, r in ranks.items()}
    return ranks, alpha


def measure_sensitivity(model: Any, batches: Iterable[Any], targets: Iterable[str] = ALL_LINEAR) -> dict[str, float]:
    """Mean |W * dL/dW| of each target linear layer over a few batches (first-order Taylor
    importance, as AdaLoRA scores singular values). ``batches`` yield ``input_ids`` tensors
    [batch, length]; the model's own language-modelling loss is used. Restores requires_grad."""
    import torch

    targets = set(targets)
    named = {}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short in targets and isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            key = name[name.index("model.layers.") :] if "model.layers." in name else name
            named[key] = module.weight
    if not named:
        raise PlanError("No target linear layers found in the model to measure.")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    scores = {k: 0.0 for k in named}
    n = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in named.values():
            w.requires_grad_(True)
            w.grad = None
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            n += 1
            with torch.no_grad():
                for k, w in named.items():
                    scores[k] += float((w * w.grad).abs().mean())
                    w.grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    if n == 0:
        raise PlanError("Calibration needs at least one batch.")
    return {k: v / n for k, v in scores.items()}
