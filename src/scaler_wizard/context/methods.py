"""Context-extension methods: a closed set of built-ins plus a checked registry for plugins.

A method declares which position encodings it supports (``rope``, ``alibi``, ``learned``),
validates its parameters, and says how a model config (and, where needed, the model's weights)
change to go from ``base_length`` to ``target_length``.

RoPE methods are expressed only through transformers' ``config.rope_parameters`` (which always
carries ``rope_theta``); the inverse frequencies are then computed by transformers' own
``ROPE_INIT_FUNCTIONS``, so we never hand-write attention.

Plugins: register with :func:`register_context_method` or expose an object through the
entry-point group ``scaler_wizard.context_methods``; every method lives in :data:`METHODS` (a
:class:`scaler_wizard.registry.Registry`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..errors import PluginError, UnsupportedMethodError
from ..models import unwrap
from ..registry import Registry

ENTRY_POINT_GROUP = "scaler_wizard.context_methods"
POSITION_ENCODINGS = ("rope", "alibi", "learned")


@runtime_checkable
class ContextMethod(Protocol):
    name: str
    encodings: frozenset[str]

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]: ...

    def update_config(self, config: Any, base_length: int, target_length: int, params: dict[str, Any]) -> None:
        """Mutate a transformers config in place for the new length."""
        ...


# --------------------------------------------------------------------------------------------
# Position-encoding detection (by model family, never by guessing from which keys exist)
# --------------------------------------------------------------------------------------------

ALIBI_MODEL_TYPES = {"bloom", "mpt"}
LEARNED_MODEL_TYPES = {"gpt2", "gpt_neo", "gpt_bigcode"}  # all keep the table at transformer.wpe


def position_encoding(config: Any) -> str:
    model_type = getattr(config, "model_type", "")
    if model_type in ALIBI_MODEL_TYPES or (model_type == "falcon" and getattr(config, "alibi", False)):
        return "alibi"
    if model_type in LEARNED_MODEL_TYPES:
        return "learned"
    if getattr(config, "rope_parameters", None):
        return "rope"
    raise UnsupportedMethodError(
        f"Cannot tell the position encoding of model type '{model_type}'.",
        hint="Supported: RoPE models (rope_parameters in config), ALiBi (bloom, mpt) and learned tables "
        f"({', '.join(sorted(LEARNED_MODEL_TYPES))}).",
    )


def base_context_length(config: Any) -> int:
    """The length the model was trained at (original length if it was already scaled)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("original_max_position_embeddings"):
        return int(rope["original_max_position_embeddings"])
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    attn = getattr(config, "attn_config", None)
    raise UnsupportedMethodError(
        f"The model config does not state its context length (no max_position_embeddings) {attn or ''}".strip(),
        hint="Set context.base_length in the recipe.",
    )


# --------------------------------------------------------------------------------------------
# RoPE methods
# --------------------------------------------------------------------------------------------


def _rope_theta(config: Any) -> float:
    return float(config.rope_parameters["rope_theta"])


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


@dataclass
class RopeMethod:
    """Base for methods that only rewrite ``config.rope_parameters``."""

    name: str = ""
    encodings: ClassVar[frozenset[str]] = frozenset({"rope"})
    allowed_params: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    #: whether ``max_position_embeddings`` must stay at the original length (dynamic NTK reads it so)
    keeps_original_max_positions: ClassVar[bool] = False

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(self.allowed_params))
        if unknown:
            raise UnsupportedMethodError(
                f"Unknown parameter(s) {unknown} for context method '{self.name}'.",
                hint=f"Allowed: {sorted(self.allowed_params) or 'none'}.",
            )
        for key, value in params.items():
            if not isinstance(value, self.allowed_params[key]) or isinstance(value, bool):
                raise UnsupportedMethodError(f"context.method_params.{key} has the wrong type ({value!r}).")
        return dict(params)

    def rope_parameters(self, config: Any, base: int, target: int, params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def update_config(self, config: Any, base_length: int, target_length: int, params: dict[str, Any]) -> None:
        params = self.validate_params(params)
        config.rope_parameters = self.rope_parameters(config, base_length, target_length, params)
        config.max_position_embeddings = base_length if self.keeps_original_max_positions else target_length


class NoScaling(RopeMethod):
    """Plain extrapolation: longer sequences with the original frequencies (the control)."""

    encodings = frozenset({"rope", "alibi", "learned"})

    def update_config(self, config, base_length, target_length, params):
        self.validate_params(params)
        if position_encoding(config) == "rope":
            config.rope_parameters = {"rope_type": "default", "rope_theta": _rope_theta(config)}
        _set_max_positions(config, target_length)


class LinearInterpolation(RopeMethod):
    """Position Interpolation (Chen et al. 2023, arXiv 2306.15595): positions scaled by L/L'."""

    def rope_parameters(self, config, base, target, params):
        return {"rope_type": "linear", "factor": target / base, "rope_theta": _rope_theta(config)}


class StaticNTK(RopeMethod):
    """NTK-aware scaling (bloc97, 2023): a new base b' = b * s^(d / (d - 2)), same positions."""

    def rope_parameters(self, config, base, target, params):
        d = _head_dim(config)
        s = target / base
        return {"rope_type": "default", "rope_theta": _rope_theta(config) * s ** (d / (d - 2))}


class DynamicNTK(RopeMethod):
    """Dynamic NTK (transformers `dynamic`): s = max(1, current_len / L) at each forward pass.

    transformers reads ``max_position_embeddings`` as the original length for this type, so the
    config keeps it at ``base_length``.
    """

    keeps_original_max_positions = True

    def rope_parameters(self, config, base, target, params):
        return {"rope_type": "dynamic", "factor": target / base, "rope_theta": _rope_theta(config)}


class YaRN(RopeMethod):
    """YaRN (Peng et al. 2023): NTK-by-parts ramp (beta_fast, beta_slow) and temperature 0.1 ln s + 1."""

    allowed_params = {"beta_fast": (int, float), "beta_slow": (int, float), "attention_factor": (int, float)}

    def rope_parameters(self, config, base, target, params):
        return {
            "rope_type": "yarn",
            "factor": target / base,
            "original_max_position_embeddings": base,
            "rope_theta": _rope_theta(config),
            **{k: float(v) for k, v in params.items()},
        }


class Llama3(RopeMethod):
    """Llama 3.1 frequency-dependent scaling (factor, low_freq_factor 1, high_freq_factor 4)."""

    allowed_params = {"low_freq_factor": (int, float), "high_freq_factor": (int, float)}

    def rope_parameters(self, config, base, target, params):
        return {
            "rope_type": "llama3",
            "factor": target / base,
            "low_freq_factor": float(params.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(params.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": base,
            "rope_theta": _rope_theta(config),
        }


class LongRoPE(RopeMethod):
    """LongRoPE (Ding et al. 2024): per-dimension rescale factors found by an evolutionary search.

    We do not run that search: the factor lists come from the user (``short_factor`` and
    ``long_factor``, d/2 values each, e.g. copied from a published Phi-3 config or from the
    authors' search code). Without them, use ``yarn``.
    """

    allowed_params = {"short_factor": list, "long_factor": list, "attention_factor": (int, float)}

    def validate_params(self, params):
        params = super().validate_params(params)
        missing = [k for k in ("short_factor", "long_factor") if k not in params]
        if missing:
            raise UnsupportedMethodError(
                f"context method 'longrope' needs {missing} in context.method_params.",
                hint="Give one factor per rotary frequency (head_dim/2 values) from a LongRoPE search.",
            )
        return params

    def rope_parameters(self, config, base, target, params):
        half = _head_dim(config) // 2
        for key in ("short_factor", "long_factor"):
            values = params[key]
            if len(values) != half or not all(isinstance(v, (int, float)) and v > 0 for v in values):
                raise UnsupportedMethodError(
                    f"context.method_params.{key} must be {half} positive numbers (head_dim/2), got {len(values)}."
                )
        out = {
            "rope_type": "longrope",
            "short_factor": [float(v) for v in params["short_factor"]],
            "long_factor": [float(v) for v in params["long_factor"]],
            "factor": target / base,
            "original_max_position_embeddings": base,
            "rope_theta": _rope_theta(config),
        }
        if "attention_factor" in params:
            out["attention_factor"] = float(params["attention_factor"])
        return out


# --------------------------------------------------------------------------------------------
# ALiBi and learned absolute positions
# --------------------------------------------------------------------------------------------


def _set_max_positions(config: Any, length: int) -> None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if hasattr(config, key):
            setattr(config, key, length)


class AlibiExtrapolation(RopeMethod):
    """ALiBi (Press et al. 2022) extrapolates by construction: the linear bias needs no new
    parameters, so only the declared maximum length is raised. We add no bias rescaling: the
    paper's own results show extrapolation to ~2x-6x the training length without it, and
    interpolating the slopes changes what every head attends to at short range."""

    encodings = frozenset({"alibi"})

    def update_config(self, config, base_length, target_length, params):
        self.validate_params(params)
        _set_max_positions(config, target_length)


class LearnedTableResize(RopeMethod):
    """Learned absolute positions (GPT-2 style): the table is resized to the new length.

    ``mode: interpolate`` (default) stretches the table linearly, the PI idea applied to a table;
    ``mode: linear_extrapolation`` keeps the trained rows and continues each dimension along the
    slope of its last ``tail`` rows.
    """

    encodings = frozenset({"learned"})
    allowed_params = {"mode": str, "tail": int}

    def validate_params(self, params):
        params = super().validate_params(params)
        if params.get("mode", "interpolate") not in ("interpolate", "linear_extrapolation"):
            raise UnsupportedMethodError("context.method_params.mode must be 'interpolate' or 'linear_extrapolation'.")
        return params

    def update_config(self, config, base_length, target_length, params):
        self.validate_params(params)
        _set_max_positions(config, target_length)

    def resize_table(self, weight, target_length: int, params: dict[str, Any]):
        import torch

        base, dim = weight.shape
        if params.get("mode", "interpolate") == "interpolate":
            # [base, dim] -> [1, dim, base] -> linear resample -> [target, dim]
            grid = weight.detach().float().t().unsqueeze(0)
            out = torch.nn.functional.interpolate(grid, size=target_length, mode="linear", align_corners=True)
            return out.squeeze(0).t().to(weight.dtype).contiguous()
        tail = int(params.get("tail", 16))
        w = weight.detach().float()
        slope = (w[-1] - w[-1 - tail]) / tail
        steps = torch.arange(1, target_length - base + 1, dtype=torch.float32)[:, None]
        return torch.cat([w, w[-1] + steps * slope]).to(weight.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_BUILTINS: dict[str, ContextMethod] = {
    "none": NoScaling(name="none"),
    "linear": LinearInterpolation(name="linear"),
    "ntk": StaticNTK(name="ntk"),
    "dynamic": DynamicNTK(name="dynamic"),
    "yarn": YaRN(name="yarn"),
    "llama3": Llama3(name="llama3"),
    "longrope": LongRoPE(name="longrope"),
    "alibi": AlibiExtrapolation(name="alibi"),
    "learned_table": LearnedTableResize(name="learned_table"),
}
def _check_method(method: Any) -> None:
    """The ContextMethod protocol, and encodings from :data:`POSITION_ENCODINGS`."""
    missing = [attr for attr in ("name", "encodings", "validate_params", "update_config") if not hasattr(method, attr)]
    if missing:
        raise PluginError(f"Context method {method!r} lacks {missing}; implement the ContextMethod protocol.")
    bad = set(method.encodings) - set(POSITION_ENCODINGS)
    if not method.encodings or bad:
        raise PluginError(f"Context method '{method.name}' declares unknown encodings {sorted(bad)}.")


METHODS: Registry[ContextMethod] = Registry(
    "context method", group=ENTRY_POINT_GROUP, check=_check_method,
    adapt=lambda obj: obj() if isinstance(obj, type) else obj,
    unknown_error=UnsupportedMethodError,
    unknown_hint=f"Set context.method to one of them, or install a plugin under the {ENTRY_POINT_GROUP!r} "
    "entry points.",
)
for _method in _BUILTINS.values():
    METHODS.register(_method)


def register_context_method(method: ContextMethod, *, replace: bool = False) -> None:
    """Register a plugin method; checks the protocol so a bad plugin fails here, not mid-run."""
    METHODS.register(method, replace=replace)


def unregister_context_method(name: str) -> None:
    METHODS.unregister(name)


def load_plugins(*, reload: bool = False) -> list[str]:
    """Load the entry-point plugins (once); a broken plugin is reported (a warning, and the
    returned problems) and skipped, never takes the run down."""
    loaded_before = METHODS.entry_points_loaded
    problems = METHODS.load_entry_points(reload=reload)
    if problems and (reload or not loaded_before):
        import warnings

        warnings.warn("Skipped broken context-method plugins: " + "; ".join(problems), stacklevel=2)
    return problems


def available_methods(encoding: str | None = None) -> list[str]:
    load_plugins()
    return [n for n, m in METHODS.items() if encoding is None or encoding in m.encodings]


def get_context_method(name: str, config: Any | None = None) -> ContextMethod:
    load_plugins()
    method = METHODS.get(name)
    if config is not None:
        enc = position_encoding(config)
        if enc not in method.encodings:
            raise UnsupportedMethodError(
                f"Context method '{name}' does not support {enc} models ({getattr(config, 'model_type', '?')}).",
                hint=f"Methods for {enc}: {', '.join(available_methods(enc))}.",
            )
    return method


def scaled_config(config: Any, method_name: str, base_length: int, target_length: int, params: dict | None = None):
    """A deep copy of ``config`` prepared for ``target_length`` by the named method."""
    method = get_context_method(method_name, config)
    new = copy.deepcopy(config)
    method.update_config(new, base_length, target_length, dict(params or {}))
    return new


def apply_to_model(
    model: Any,
    method_name: str,
    base_length: int,
    target_length: int,
    params: dict | None = None,
    *,
    original_config: Any | None = None,
):
    """Apply a method to a loaded model in place: config, rotary modules, position tables.

    ``original_config`` is the unscaled config: every stage scales from it (base -> stage
    length), never from the previous stage's already-scaled settings. Rotary modules compute
    their frequencies at construction from the config, so they are rebuilt from the new config;
    learned tables are resized. Works through PEFT wrappers.
    """
    import torch

    params = dict(params or {})
    base_model = unwrap(model)
    source = original_config if original_config is not None else base_model.config
    method = get_context_method(method_name, source)
    new_config = scaled_config(source, method_name, base_length, target_length, params)
    _copy_config_fields(new_config, base_model.config)

    for name, module in list(base_model.named_modules()):
        if hasattr(module, "inv_freq") and hasattr(module, "rope_type"):
            device = module.inv_freq.device
            fresh = type(module)(config=base_model.config)
            fresh.to(device)
            _set_submodule(base_model, name, fresh)

    if isinstance(method, LearnedTableResize):
        table = _learned_position_table(base_model)
        new_weight = method.resize_table(table.weight, target_length, params)
        table.weight = torch.nn.Parameter(new_weight, requires_grad=table.weight.requires_grad)
        table.num_embeddings = target_length
    return base_model.config


def _copy_config_fields(src: Any, dst: Any) -> None:
    for key in ("rope_parameters", "max_position_embeddings", "n_positions", "max_seq_len"):
        if hasattr(src, key):
            setattr(dst, key, copy.deepcopy(getattr(src, key)))


def _learned_position_table(model: Any):
    try:
        return model.get_submodule("transformer.wpe")
    except AttributeError:
        raise UnsupportedMethodError("Could not find the learned position table (transformer.wpe).") from None


def _set_submodule(root: Any, dotted: str, module: Any) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
