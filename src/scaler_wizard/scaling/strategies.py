"""Scaling strategies: how a model gains trainable capacity.

A strategy is any object satisfying :class:`ScalerStrategy`. Built in:

* ``lora`` -- PEFT LoRA adapters (with rsLoRA and DoRA options, per-module ``rank_pattern``);
* ``block_expansion`` -- real parameter growth in the style of LLaMA Pro (Wu et al. 2024,
  "LLaMA Pro: Progressive LLaMA with Block Expansion"): new decoder blocks are inserted after
  evenly spaced groups of the original ones, each a copy of the block below it with its output
  projections (``o_proj``, ``down_proj``) zeroed, so every new block is an identity map through
  its residual connections and the model's output is unchanged at insertion. The old blocks are
  frozen; only the new ones train (optionally with the norms and embeddings). The result is a
  plain, larger Hugging Face model (``num_hidden_layers`` increased, ``layer_idx`` renumbered)
  that loads with ``transformers`` alone;
* ``full`` -- full fine-tuning: every weight trains (no new capacity; the baseline a LoRA or
  LongLoRA run is measured against). Its base teacher would need a second copy of the weights,
  so knowledge preservation takes ``distillation.teacher: model`` (or ``offline``).

Strategies live in :data:`STRATEGIES` (a :class:`scaler_wizard.registry.Registry`).
Third-party strategies register with :func:`register_strategy` or through the entry-point group
``scaler_wizard.strategies`` (the entry point names a strategy object, or a class / factory
taking no arguments). A broken plugin is reported by :func:`load_plugins` and never takes the
built-ins down.

Torch, transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from ..errors import PlanError, PluginError, UnsupportedMethodError
from ..models import decoder_and_head, unwrap
from ..recipe import BlockExpansionSection, LoraSection
from ..registry import Registry
from .memory import ALL_LINEAR, ModelDims, StrategyPlan

ENTRY_POINT_GROUP = "scaler_wizard.strategies"


@runtime_checkable
class ScalerStrategy(Protocol):
    """What a scaling strategy provides.

    ``plan`` is pure (the memory planner and the rank resolver call it without a model);
    ``prepare`` turns a loaded causal LM into the model to train (only the new capacity
    trainable). Export is the same for every strategy (``models.export_merged``: merge adapters
    if there are any, save, reload and compare), so a strategy has no export of its own.
    """

    name: str
    description: str

    def plan(self, dims: ModelDims, options: Mapping[str, Any]) -> StrategyPlan: ...

    def prepare(self, model: Any, options: Mapping[str, Any]) -> Any: ...


def _check_strategy(strategy: Any) -> None:
    missing = [m for m in ("plan", "prepare") if not callable(getattr(strategy, m, None))]
    if not isinstance(getattr(strategy, "description", None), str):
        missing.append("description (str)")
    if missing:
        raise PluginError(
            f"Strategy {getattr(strategy, 'name', strategy)!r} does not implement the ScalerStrategy protocol: "
            f"missing {', '.join(missing)}.",
            hint="See scaler_wizard.scaling.strategies.ScalerStrategy.",
        )


def _strategy_from_entry_point(obj: Any) -> Any:
    """An entry point names a strategy object, or a class / factory taking no arguments."""
    return obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "prepare")) else obj


STRATEGIES: Registry[ScalerStrategy] = Registry(
    "scaling strategy", group=ENTRY_POINT_GROUP, check=_check_strategy, adapt=_strategy_from_entry_point,
    unknown_error=PluginError,
    unknown_hint=f"Install a package that provides it under the {ENTRY_POINT_GROUP!r} entry points.",
)


def register_strategy(strategy: Any, *, replace: bool = False) -> ScalerStrategy:
    """Add a strategy to the registry after checking that it really is one."""
    return STRATEGIES.register(strategy, replace=replace)


def unregister_strategy(name: str) -> None:
    """Remove a strategy (tests, or a plugin replacing a built-in on purpose)."""
    STRATEGIES.unregister(name)


def load_plugins(*, reload: bool = False) -> list[str]:
    """Register the strategies advertised under the ``scaler_wizard.strategies`` entry points.

    Returns the problems found (one line per broken plugin) instead of raising, so one bad
    plugin cannot take the others down; :func:`get_strategy` repeats them when a name is missing.
    """
    return STRATEGIES.load_entry_points(reload=reload)


def available_strategies() -> list[str]:
    return STRATEGIES.names()


def get_strategy(name: str) -> ScalerStrategy:
    return STRATEGIES.get(name)


def _validate(model_cls: type[BaseModel], options: Mapping[str, Any], strategy: str) -> Any:
    try:
        return model_cls.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(options)'}: {e['msg']}" for e in exc.errors())
        raise PlanError(f"Invalid options for strategy {strategy!r}: {problems}.") from None


# ------------------------------------------------------------------------------------------
# lora
# ------------------------------------------------------------------------------------------


class LoraOptions(LoraSection):
    """The recipe's ``scaling.lora`` section (one set of fields and bounds), and what the
    strategy derives from it."""

    def targets(self) -> tuple[str, ...]:
        return ALL_LINEAR if self.target_modules == "all-linear" else tuple(self.target_modules)

    def to_peft(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            modules_to_save=self.modules_to_save or None,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            task_type="CAUSAL_LM",
        )


class LoraStrategy:
    name = "lora"
    description = "PEFT LoRA adapters (rsLoRA, DoRA, per-module ranks); exported merged or as an adapter"

    def options(self, options: Mapping[str, Any]) -> LoraOptions:
        return _validate(LoraOptions, options, self.name)

    def plan(self, dims: ModelDims, options: Mapping[str, Any]) -> StrategyPlan:
        o = self.options(options)
        saved = set(o.modules_to_save)
        return StrategyPlan(
            strategy="lora", lora_rank=o.rank, lora_targets=o.targets(), lora_dropout=o.dropout,
            rank_pattern=dict(o.rank_pattern), use_dora=o.use_dora,
            train_norms=any("norm" in m for m in saved),
            train_embeddings=bool(saved & {"embed_tokens", "lm_head"}),
        )

    def prepare(self, model: Any, options: Mapping[str, Any]) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, self.options(options).to_peft())


# ------------------------------------------------------------------------------------------
# block_expansion
# ------------------------------------------------------------------------------------------


BlockExpansionOptions = BlockExpansionSection  # the recipe's scaling.block_expansion section


def insertion_points(num_layers: int, new_blocks: int) -> list[int]:
    """Indices (in the original stack) after which a new block goes: the end of each of
    ``new_blocks`` evenly sized groups (LLaMA Pro's interleaving). Pure."""
    if new_blocks < 1:
        raise PlanError(f"new_blocks must be >= 1 (got {new_blocks}).")
    if new_blocks > num_layers:
        raise PlanError(
            f"Cannot add {new_blocks} blocks to a {num_layers}-layer model: at most one new block per "
            "original block.", hint=f"Use new_blocks <= {num_layers}.",
        )
    return [round((k + 1) * num_layers / new_blocks) - 1 for k in range(new_blocks)]


def _decoder(model: Any) -> Any:
    """(the transformers model, its decoder) through a PEFT wrapper; the decoder must hold a
    ``layers`` list."""
    decoder, _ = decoder_and_head(model)
    if getattr(decoder, "layers", None) is None:
        raise UnsupportedMethodError(
            f"block_expansion needs a decoder with a `layers` list (Llama, Mistral, Qwen2 ...); "
            f"{type(unwrap(model)).__name__} has none.", hint="Use the lora strategy for this model.",
        )
    return unwrap(model), decoder


def _zero_output_projections(block: Any) -> None:
    """Zero the projections that write into the residual stream: the block becomes identity."""
    import torch

    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    outs = [getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)]
    if any(o is None for o in outs):
        raise UnsupportedMethodError(
            f"block_expansion expects self_attn.o_proj and mlp.down_proj in each block; {type(block).__name__} "
            "differs.", hint="Use the lora strategy for this model.",
        )
    with torch.no_grad():
        for proj in outs:
            proj.weight.zero_()
            if getattr(proj, "bias", None) is not None:
                proj.bias.zero_()


def expand_blocks(model: Any, new_blocks: int) -> list[int]:
    """Insert identity-initialised copies of blocks in place; returns the new blocks' indices."""
    import torch

    base, decoder = _decoder(model)
    old = list(decoder.layers)
    after = set(insertion_points(len(old), new_blocks))
    stack, new_idx = [], []
    for i, block in enumerate(old):
        stack.append(block)
        if i in after:
            twin = copy.deepcopy(block)
            _zero_output_projections(twin)
            new_idx.append(len(stack))
            stack.append(twin)
    decoder.layers = torch.nn.ModuleList(stack)
    for j, block in enumerate(stack):  # the KV cache is indexed by layer_idx
        for mod in (block, getattr(block, "self_attn", None)):
            if mod is not None and hasattr(mod, "layer_idx"):
                mod.layer_idx = j
    cfg = base.config
    layer_types = getattr(cfg, "layer_types", None)
    cfg.num_hidden_layers = len(stack)
    if isinstance(layer_types, list) and len(layer_types) == len(old):
        grown = []
        for i, kind in enumerate(layer_types):
            grown += [kind, kind] if i in after else [kind]
        cfg.layer_types = grown
    return new_idx


@contextlib.contextmanager
def bypass_new_blocks(model: Any) -> Iterator[None]:
    """The grown model seen as its base: the new blocks are skipped for the duration (the
    ``base`` distillation teacher of block expansion; no second copy of any weight)."""
    base, decoder = _decoder(model)
    new = set(getattr(base, "scaler_wizard_new_blocks", ()))
    if not new:
        yield
        return
    cfg = base.config
    full_layers, full_n, full_types = decoder.layers, cfg.num_hidden_layers, getattr(cfg, "layer_types", None)
    keep = [i for i in range(len(full_layers)) if i not in new]
    decoder.layers = type(full_layers)([full_layers[i] for i in keep])
    cfg.num_hidden_layers = len(keep)
    if isinstance(full_types, list):
        cfg.layer_types = [full_types[i] for i in keep]
    try:
        yield
    finally:
        decoder.layers, cfg.num_hidden_layers = full_layers, full_n
        if isinstance(full_types, list):
            cfg.layer_types = full_types


class BlockExpansionStrategy:
    name = "block_expansion"
    description = "LLaMA Pro block expansion: new identity-initialised decoder blocks; old blocks frozen"

    def options(self, options: Mapping[str, Any]) -> BlockExpansionOptions:
        return _validate(BlockExpansionOptions, options, self.name)

    def plan(self, dims: ModelDims, options: Mapping[str, Any]) -> StrategyPlan:
        o = self.options(options)
        insertion_points(dims.num_layers, o.new_blocks)  # fail early on an impossible count
        return StrategyPlan(strategy="block_expansion", new_blocks=o.new_blocks,
                            train_norms=o.train_norms, train_embeddings=o.train_embeddings)

    def prepare(self, model: Any, options: Mapping[str, Any]) -> Any:
        o = self.options(options)
        new_idx = expand_blocks(model, o.new_blocks)
        base, decoder = _decoder(model)
        for p in base.parameters():
            p.requires_grad_(False)
        for j in new_idx:
            for p in decoder.layers[j].parameters():
                p.requires_grad_(True)
        if o.train_norms:
            for name, p in base.named_parameters():
                if "norm" in name:
                    p.requires_grad_(True)
        if o.train_embeddings:
            base.get_input_embeddings().weight.requires_grad_(True)
            base.get_output_embeddings().weight.requires_grad_(True)
        base.scaler_wizard_new_blocks = new_idx  # plain attribute: not saved with the model
        return model


# ------------------------------------------------------------------------------------------
# full
# ------------------------------------------------------------------------------------------


class FullFineTuneOptions(BaseModel):
    """Full fine-tuning has no options of its own (``scaling.options`` must be empty)."""

    model_config = {"extra": "forbid"}


class FullFineTuneStrategy:
    name = "full"
    description = "full fine-tuning: every weight trains (the baseline LoRA is measured against)"

    def options(self, options: Mapping[str, Any]) -> FullFineTuneOptions:
        return _validate(FullFineTuneOptions, options, self.name)

    def plan(self, dims: ModelDims, options: Mapping[str, Any]) -> StrategyPlan:
        self.options(options)
        return StrategyPlan(strategy="full", train_norms=True, train_embeddings=True)

    def prepare(self, model: Any, options: Mapping[str, Any]) -> Any:
        self.options(options)
        for p in model.parameters():
            p.requires_grad_(True)
        return model


register_strategy(LoraStrategy())
register_strategy(BlockExpansionStrategy())
register_strategy(FullFineTuneStrategy())


# ------------------------------------------------------------------------------------------
# from a recipe
# ------------------------------------------------------------------------------------------


def attach_strategy(recipe: Any, model: Any) -> Any:
    """Add capacity through the strategy registry (``scaling/strategies.py``): PEFT LoRA
    adapters (``lora``), new decoder blocks (``block_expansion``), or a plugin strategy from the
    ``scaler_wizard.strategies`` entry points. Built-ins take their typed recipe section."""
    return get_strategy(recipe.scaling.strategy).prepare(model, strategy_options(recipe))


def strategy_options(recipe: Any) -> dict[str, Any]:
    name = recipe.scaling.strategy
    typed = {"lora": recipe.scaling.lora, "block_expansion": recipe.scaling.block_expansion}
    return typed[name].model_dump() if name in typed else dict(recipe.scaling.options)
