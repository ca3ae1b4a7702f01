"""Every input check in one place, before anything is written: the recipe's schema, then its
meaning (model folder and config, context method and its parameters, strategy options, stage
plan, probe files, data). ``scaler-wizard validate`` and ``run`` call the same function, and
every problem is reported at once with its field path.

Drop-in probe files are *read* here (parsed, never executed): user code runs only after the
run has been approved.
"""

from __future__ import annotations

import ast
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError, ScalerWizardError
from .recipe import Recipe, load_recipe, resolve_path


@dataclass
class RunInputs:
    """What a run is made of, checked: the recipe, where its paths resolve, the model folder and
    config, the stage plan and the texts."""

    recipe: Recipe
    recipe_dir: Path
    model_dir: Path
    model_config: Any
    base_length: int
    stages: list[Any]
    train_texts: list[str]
    eval_texts: list[str]
    # the data files as read: (path, bytes, sha256), checked against the approval once it exists
    data_reads: list[tuple[Path, int, str]] = field(default_factory=list)
    # saved `datasets` folders: re-read from the approved copy after the approval
    data_folders: list[str] = field(default_factory=list)


def check_recipe(recipe_path: str | Path | None) -> tuple[Recipe, Path]:
    """The recipe's schema (pydantic; every problem with its field path)."""
    return load_recipe(recipe_path)


def check_inputs(recipe: Recipe, recipe_dir: Path, *, source: str, read_data: bool = True) -> RunInputs:
    """The recipe's meaning. Raises :class:`RecipeError` listing every problem found (a model
    problem stops the checks that need the model's config)."""
    from .context.methods import base_context_length

    problems: list[tuple[str, str]] = []
    errors: list[ScalerWizardError] = []  # the typed errors behind the problems
    model_dir = resolve_path(recipe.model.path, recipe_dir)
    model_config = _collect(problems, "model.path", lambda: _model_config(model_dir), errors)
    base_length = stages = None
    if model_config is not None:
        base_length = recipe.context.base_length or base_context_length(model_config)
        _collect(problems, "context.method_params", lambda: _check_context_method(recipe, model_config, base_length),
                 errors)
        stages = _collect(problems, "context.schedule", lambda: _plan_stages(recipe, base_length), errors)
    _collect(problems, "scaling.options" if recipe.scaling.strategy not in ("lora", "block_expansion")
             else f"scaling.{recipe.scaling.strategy}", lambda: _check_strategy(recipe, model_config), errors)
    _collect(problems, "model.quantization", lambda: _check_quantization(recipe), errors)
    for name, message in _check_probe_files(recipe, recipe_dir):
        problems.append((name, message))
    problems.extend(_check_lm_eval(recipe))
    texts = None
    if read_data:
        texts = _collect(problems, "data", lambda: read_texts(recipe, recipe_dir), errors)
    if len(problems) == 1 and len(errors) == 1:
        raise errors[0]  # one problem: its own type, message and hint
    if problems:
        raise RecipeError(source, problems)
    train_texts, eval_texts, reads = texts if texts is not None else ([], [], [])
    folders = [v for v in [*recipe.data.train, *recipe.data.eval] if resolve_path(v, recipe_dir).is_dir()]
    return RunInputs(recipe, recipe_dir, model_dir, model_config, base_length, stages, train_texts, eval_texts,
                     reads, folders)


def _collect(problems: list[tuple[str, str]], field: str, check, errors: list[ScalerWizardError]) -> Any:
    try:
        return check()
    except RecipeError as exc:
        problems.extend(exc.problems)
    except ScalerWizardError as exc:
        errors.append(exc)
        hint = f" ({exc.hint})" if getattr(exc, "hint", None) else ""
        problems.append((field, f"{exc}{hint}"))
    return None


def _model_config(model_dir: Path) -> Any:
    from .models import check_model_dir, load_model_config

    check_model_dir(model_dir)
    return load_model_config(model_dir)


def _check_context_method(recipe: Recipe, model_config: Any, base_length: int) -> None:
    """The method suits the model's position encoding, and its parameters are accepted and
    produce a config for the target length (computed on a copy; nothing is applied)."""
    from .context.methods import get_context_method, scaled_config
    from .errors import PlanError

    method = get_context_method(recipe.context.method, model_config)
    try:
        method.validate_params(dict(recipe.context.method_params))
        scaled_config(copy.deepcopy(model_config), recipe.context.method, base_length,
                      max(recipe.context.target_length, base_length + 1), dict(recipe.context.method_params))
    except ScalerWizardError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise PlanError(f"context.method_params {dict(recipe.context.method_params)} are not valid for "
                        f"{recipe.context.method}: {exc}") from None


def _plan_stages(recipe: Recipe, base_length: int) -> list[Any]:
    from .context.schedule import build_stages

    ev = recipe.evaluation
    return build_stages(
        base_length,
        recipe.context.target_length,
        recipe.context.method,
        recipe.context.method_params,
        recipe.training.steps_per_stage,
        schedule=recipe.context.schedule,
        passkey_min=ev.passkey.min_accuracy if ev.passkey.enabled else None,
        passkey_min_depth=ev.passkey.min_depth_accuracy if ev.passkey.enabled else None,
        ppl_max_ratio=ev.perplexity.max_ratio_to_base if ev.perplexity.enabled else None,
        short_max_regression_pct=ev.short_context.max_regression_pct if ev.short_context.enabled else None,
    )


def _check_strategy(recipe: Recipe, model_config: Any = None) -> None:
    """The strategy exists, accepts its options (built-ins: their typed section; plugins:
    ``scaling.options`` through the plugin's own ``options`` validator when it has one), and can
    plan on this model (e.g. no more new blocks than the model has blocks)."""
    from .scaling.strategies import get_strategy, strategy_options

    strategy = get_strategy(recipe.scaling.strategy)
    options = strategy_options(recipe)
    validate = getattr(strategy, "options", None)
    if callable(validate):
        validate(options)
    plan = getattr(strategy, "plan", None)
    if callable(plan) and model_config is not None:
        from .scaling.memory import ModelDims

        try:
            dims = ModelDims.from_config(model_config)
        except Exception:  # noqa: BLE001 - a non-Llama-family config: the strategy checks at prepare time
            return
        plan(dims, options)


def _check_quantization(recipe: Recipe) -> None:
    """QLoRA (``model.quantization``) loads through bitsandbytes, which needs a CUDA GPU."""
    if recipe.model.quantization is None:
        return
    import importlib.util

    import torch

    from .errors import PlanError
    from .models import QLORA_CPU_HINT

    if not torch.cuda.is_available():
        raise PlanError(f"model.quantization ({recipe.model.quantization.bits}-bit QLoRA) needs a CUDA GPU; "
                        "this machine has none.", hint=QLORA_CPU_HINT)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PlanError("model.quantization (QLoRA) needs the bitsandbytes package, which is not installed.",
                        hint="pip install bitsandbytes, or remove model.quantization to train LoRA unquantized.")


def _check_probe_files(recipe: Recipe, recipe_dir: Path) -> list[tuple[str, str]]:
    """Custom probes name a built-in, an entry point or a class in a drop-in file. Drop-in files
    are parsed, not run: a class that sets ``name = "..."`` and defines ``run`` counts."""
    if not recipe.evaluation.custom:
        return []
    from importlib import metadata

    from .evaluation.probes import BUILTIN_PROBES
    from .evaluation.registry import ENTRY_POINT_GROUP

    problems: list[tuple[str, str]] = []
    known = set(BUILTIN_PROBES) | {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    for i, folder in enumerate(recipe.evaluation.probe_dirs):
        path = resolve_path(folder, recipe_dir)
        if not path.is_dir():
            problems.append((f"evaluation.probe_dirs[{i}]", f"{path} is not a folder"))
            continue
        for file in sorted(path.glob("*.py")):
            try:
                known |= _probe_names_in(file)
            except (SyntaxError, UnicodeDecodeError, OSError) as exc:
                problems.append((f"evaluation.probe_dirs[{i}]", f"{file}: cannot be parsed ({exc})"))
    for i, spec in enumerate(recipe.evaluation.custom):
        if spec.name not in known:
            problems.append((f"evaluation.custom[{i}].name",
                             f"unknown probe {spec.name!r}; available: {', '.join(sorted(known))}"))
    return problems


def _check_lm_eval(recipe: Recipe) -> list[tuple[str, str]]:
    """``evaluation.lm_eval``: lm-eval installed, its tasks known and offline (lm-eval's task index)."""
    if recipe.evaluation.lm_eval is None:
        return []
    from .evaluation.lm_eval_probe import check_spec

    return check_spec(recipe.evaluation.lm_eval, recipe.context.target_length)


def _probe_names_in(file: Path) -> set[str]:
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    names = set()
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        has_run = any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in node.body)
        for n in node.body:
            if (isinstance(n, ast.Assign) and has_run and len(n.targets) == 1
                    and isinstance(n.targets[0], ast.Name) and n.targets[0].id == "name"
                    and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)):
                names.add(n.value.value)
    return names


def read_texts(recipe: Recipe, recipe_dir: Path, folders: dict[str, Path] | None = None
               ) -> tuple[list[str], list[str], list[tuple[Path, int, str]]]:
    """(train texts, eval texts, reads). Each data file is read once, without following a link,
    and parsed from a private copy of exactly those bytes; its (path, size, sha256) is returned
    so the bytes used can be checked against the approval (no window between hashing and use).
    ``folders``: approved copies of saved ``datasets`` folders to read instead of the originals."""
    import tempfile

    from .data import load_texts, split_heldout
    from .errors import ContractError, DataError
    from .safety.contract import read_and_hash

    reads: list[tuple[Path, int, str]] = []
    with tempfile.TemporaryDirectory(prefix="scaler-wizard-data-") as private:
        def load(values: list[str]) -> list[str]:
            paths, copies = [], []
            for value in values:
                path = resolve_path(value, recipe_dir)
                if folders and value in folders:
                    paths.append(folders[value])
                elif path.is_dir() or not path.exists():
                    paths.append(path)  # a saved datasets folder, or a clear "does not exist" from load_texts
                else:
                    try:
                        data, size, digest = read_and_hash(os.path.realpath(path), f"data file {path}")
                    except ContractError as exc:  # not a regular file (a FIFO, a device ...)
                        raise DataError(str(exc), hint="Point data.train / data.eval at regular files.") from None
                    reads.append((path, size, digest))
                    copy = Path(private) / str(len(reads)) / path.name
                    copy.parent.mkdir()
                    copy.write_bytes(data)
                    paths.append(copy)
                    copies.append((copy, path))
            try:
                return load_texts(paths, recipe.data.text_field)
            except DataError as exc:  # name the user's file, not the private copy
                message = exc.message
                for copy, original in copies:
                    message = message.replace(str(copy), str(original))
                raise DataError(message, hint=exc.hint) from None

        train = load(recipe.data.train)
        if recipe.data.eval:
            return train, load(recipe.data.eval), reads
    return (*split_heldout(train, recipe.data.eval_fraction, recipe.run.seed), reads)


def load_custom_probes(recipe: Recipe, probe_dirs: list[Path]) -> list[Any]:
    """Instances of the recipe's extra probes (entry points and the drop-in folders given: the
    approved copies). This runs the drop-in code, so the pipeline calls it only after the run was
    approved."""
    if not recipe.evaluation.custom:
        return []
    from .evaluation.registry import discover_probes

    catalog = discover_probes(probe_dirs)
    return [catalog.create(spec.name, **spec.options) for spec in recipe.evaluation.custom]
