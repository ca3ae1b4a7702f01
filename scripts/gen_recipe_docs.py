"""Write the recipe reference from the typed recipe (``scaler_wizard.recipe.Recipe``).

    python scripts/gen_recipe_docs.py          # writes both files
    python scripts/gen_recipe_docs.py --check  # exit 1 if either committed file is out of date

Outputs:

* ``docs/recipe.md``: every field, section by section (dotted path, type, default, allowed
  values or bounds, description) -- the page the recipe error messages point at;
* ``src/scaler_wizard/schemas/recipe.schema.json``: pydantic's JSON Schema of the recipe, for
  editors (e.g. ``# yaml-language-server: $schema=...`` at the top of a recipe).

``tests/test_recipe_docs.py`` regenerates both in memory and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN_PATH = ROOT / "docs" / "recipe.md"
SCHEMA_PATH = ROOT / "src" / "scaler_wizard" / "schemas" / "recipe.schema.json"


def _builtin_choices() -> dict[str, str]:
    """Fields typed ``str`` whose values come from a registry: the built-in names (plugins add more)."""
    from scaler_wizard.context.methods import _BUILTINS
    from scaler_wizard.evaluation.probes import BUILTIN_PROBES

    def names(values: Any) -> str:
        return ", ".join(f"`{n}`" for n in values)

    return {
        "scaling.strategy": f"{names(['lora', 'block_expansion'])}, or a plugin strategy "
        "(entry points `scaler_wizard.strategies`)",
        "context.method": f"{names(_BUILTINS)}, or a plugin method (entry points `scaler_wizard.context_methods`)",
        "evaluation.custom[].name": f"{names(sorted(BUILTIN_PROBES))}, a plugin probe (entry points "
        "`scaler_wizard.probes`) or a class in a file of `evaluation.probe_dirs`",
    }


# ------------------------------------------------------------------------------------------
# types, bounds, defaults
# ------------------------------------------------------------------------------------------

_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def _is_model(tp: Any) -> bool:
    return inspect.isclass(tp) and issubclass(tp, BaseModel)


def _bounds(metadata: list[Any]) -> list[str]:
    out = []
    for m in metadata:
        if isinstance(m, FieldInfo):
            out += _bounds(m.metadata)
        elif isinstance(m, at.Ge):
            out.append(f">= {m.ge}")
        elif isinstance(m, at.Gt):
            out.append(f"> {m.gt}")
        elif isinstance(m, at.Le):
            out.append(f"<= {m.le}")
        elif isinstance(m, at.Lt):
            out.append(f"< {m.lt}")
        elif isinstance(m, at.MinLen):
            out.append(f"at least {m.min_length} item(s)" if m.min_length != 1 else "not empty")
        elif isinstance(m, at.MaxLen):
            out.append(f"at most {m.max_length} item(s)")
    return out


def _type(tp: Any, top: bool = True) -> str:
    """A reader's spelling of an annotation: ``integer (>= 1) or "auto"``, ``list of string``.
    A field that is one Literal shows its base type (its values are in the Allowed column)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return _SCALARS[tp]
    if tp is Any:
        return "any"
    if _is_model(tp):
        return "section"
    if origin is Literal:
        if top:
            return " or ".join(dict.fromkeys(_SCALARS.get(type(a), "value") for a in args))
        return " | ".join(json.dumps(a) for a in args)
    if origin is typing.Annotated:
        bounds = _bounds(list(args[1:]))
        return _type(args[0], False) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin in (Union, types.UnionType):
        return " or ".join(_type(a, False) for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list of {_type(args[0], False)}" if args else "list"
    if origin is dict:
        return f"mapping of {_type(args[0], False)} to {_type(args[1], False)}" if args else "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "**required**"
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def _allowed(field: FieldInfo) -> str:
    parts = []
    if typing.get_origin(field.annotation) is Literal:
        parts.append("one of " + ", ".join(f"`{json.dumps(a)}`" for a in typing.get_args(field.annotation)))
    parts += [f"`{b}`" for b in _bounds(field.metadata)]
    return "; ".join(parts)


def _doc(obj: Any) -> str:
    """First paragraph of a class's own docstring (not an inherited one), on one line."""
    text = inspect.cleandoc(obj.__dict__.get("__doc__") or "").replace("``", "`")
    return " ".join(text.split("\n\n")[0].split())


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


# ------------------------------------------------------------------------------------------
# walking the recipe
# ------------------------------------------------------------------------------------------


def _nested_model(tp: Any) -> tuple[str, type[BaseModel]] | None:
    """(path suffix, model) when a field holds a section: itself, a list of them, a mapping to them."""
    if _is_model(tp):
        return "", tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        models = [a for a in args if _is_model(a)]
        return ("", models[0]) if len(models) == 1 else None
    if origin is list and args and _is_model(args[0]):
        return "[]", args[0]
    if origin is dict and len(args) == 2 and _is_model(args[1]):
        keys = typing.get_args(args[0]) if typing.get_origin(args[0]) is Literal else ()
        return ".<" + ("|".join(map(str, keys)) if keys else "key") + ">", args[1]
    return None


def _sections(model: type[BaseModel], path: str, choices: dict[str, str], level: int = 2) -> list[str]:
    """Markdown for one section and, after it, each section nested in it."""
    doc = _doc(model)
    lines = [f"{'#' * min(level, 4)} `{path}`", ""]
    if doc:
        lines += [doc, ""]
    lines += ["| Field | Type | Default | Allowed | Description |", "|---|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        dotted = f"{path}.{name}"
        sub = _nested_model(field.annotation)
        allowed = _allowed(field) or choices.get(dotted, "")
        description = field.description or ""
        if sub is not None:
            suffix, sub_model = sub
            description = description or _doc(sub_model)
            anchor = f"{dotted}{suffix}"
            description = f"{description} (see [`{anchor}`](#{_anchor(anchor)}))".strip()
            nested.append((anchor, sub_model))
        lines.append(f"| `{dotted}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} | "
                     f"{_cell(allowed)} | {_cell(description)} |")
    lines.append("")
    for anchor, sub_model in nested:
        lines += _sections(sub_model, anchor, choices, level + 1)
    return lines


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return "".join(c for c in heading.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def render_markdown() -> str:
    from scaler_wizard.recipe import Recipe

    choices = _builtin_choices()
    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by scripts/gen_recipe_docs.py from scaler_wizard.recipe.Recipe; do not edit by hand. -->",
        "",
        ("A recipe is one YAML file with the sections below. Every field is listed with its dotted path, "
         "its type, its default (**required** fields have none), the values or bounds it accepts, and what "
         "it does. Unknown keys are errors, and `scaler-wizard validate RECIPE` reports every problem at "
         "once with its field path. `builtin:` paths name files shipped in the package (`builtin:demo` is "
         "the demo model)."),
        "",
        ("Editors can check recipes as you type with the JSON Schema "
         "[`src/scaler_wizard/schemas/recipe.schema.json`](../src/scaler_wizard/schemas/recipe.schema.json), "
         "e.g. with the line `# yaml-language-server: $schema=<path to recipe.schema.json>` at the top of "
         "the recipe. After changing the recipe's fields, run `python scripts/gen_recipe_docs.py` to "
         "regenerate both."),
        "",
        "## Sections",
        "",
        "| Section | Default | Description |",
        "|---|---|---|",
    ]
    sections = []
    for name, field in Recipe.model_fields.items():
        sub = _nested_model(field.annotation)
        if sub is None:
            continue
        sections.append((name, sub[1]))
        lines.append(f"| [`{name}`](#{_anchor(name)}) | {_cell(_default(field))} | "
                     f"{_cell(field.description or _doc(sub[1]))} |")
    top = [(n, f) for n, f in Recipe.model_fields.items() if _nested_model(f.annotation) is None]
    lines += ["", "Top-level fields:", "", "| Field | Type | Default | Allowed | Description |",
              "|---|---|---|---|---|"]
    for name, field in top:
        lines.append(f"| `{name}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} | "
                     f"{_cell(_allowed(field))} | {_cell(field.description or '')} |")
    lines.append("")
    for name, model in sections:
        lines += _sections(model, name, choices)
    return "\n".join(lines).rstrip() + "\n"


def render_schema() -> str:
    from scaler_wizard.recipe import Recipe

    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by scripts/gen_recipe_docs.py from scaler_wizard.recipe.Recipe; do not edit by hand. "
        "Reference: docs/recipe.md.",
        **Recipe.model_json_schema(mode="validation"),
    }
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def outputs() -> dict[Path, str]:
    return {MARKDOWN_PATH: render_markdown(), SCHEMA_PATH: render_schema()}


def stale() -> list[Path]:
    """The committed files that differ from what the recipe generates now."""
    return [p for p, text in outputs().items() if not p.is_file() or p.read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report out-of-date files (exit 1)")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for p in old:
            print(f"out of date: {p.relative_to(ROOT)} (run `python scripts/gen_recipe_docs.py`)")
        return 1 if old else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
