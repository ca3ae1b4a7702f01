"""docs/recipe.md and schemas/recipe.schema.json are generated from the typed recipe and kept in sync."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import yaml
from conftest import ROOT
from pydantic import BaseModel

from scaler_wizard.recipe import Recipe, resolve_path

FIX = "run `python scripts/gen_recipe_docs.py`"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_recipe_docs", ROOT / "scripts" / "gen_recipe_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def test_committed_reference_is_up_to_date():
    for path, text in GEN.outputs().items():
        rel = path.relative_to(ROOT)
        assert path.is_file(), f"{rel} is missing: {FIX}"
        assert path.read_text(encoding="utf-8") == text, f"{rel} is out of date with recipe.py: {FIX}"


def _paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        nested = GEN._nested_model(field.annotation)
        if nested is not None:
            out += _paths(nested[1], f"{prefix}{name}{nested[0]}.")
    return out


def test_every_field_is_documented_with_its_default():
    text = GEN.render_markdown()
    paths = _paths(Recipe)
    assert len(paths) > 100
    missing = [p for p in paths if f"| `{p}` |" not in text and f"[`{p}`]" not in text]
    assert not missing, missing
    row = next(line for line in text.splitlines() if line.startswith("| `scaling.lora.rank` |"))
    assert "`16`" in row and "`>= 1`" in row and "`<= 4096`" in row
    row = next(line for line in text.splitlines() if line.startswith("| `context.gate_policy` |"))
    assert '`"extend"`' in row and '`"rollback"`' in row
    assert "| `context.target_length` | integer | **required** |" in text


def test_schema_accepts_the_shipped_recipes_and_refuses_a_typo():
    schema = json.loads(GEN.render_schema())
    jsonschema.Draft202012Validator.check_schema(schema)
    shipped = [resolve_path("builtin:recipes/demo.yaml"), *sorted(resolve_path("builtin:templates").glob("*.yaml"))]
    assert len(shipped) > 2
    for path in shipped:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        Recipe.model_validate(data)
        jsonschema.validate(data, schema)
    demo = yaml.safe_load(shipped[0].read_text(encoding="utf-8"))
    typo = {**demo, "training": {**demo.get("training", {}), "learning_rat": 0.1}}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(typo))
    assert errors and any("learning_rat" in e.message for e in errors)
