import pytest
import yaml

from scaler_wizard.errors import RecipeError
from scaler_wizard.recipe import DEMO_RECIPE, load_recipe, parse_recipe, resolve_path


def test_shipped_demo_recipe_validates():
    recipe, _ = load_recipe(DEMO_RECIPE)
    assert recipe.context.target_length == 1024
    assert recipe.context.method == "yarn"
    assert resolve_path(recipe.data.train[0]).name == "train.jsonl"


def test_every_problem_reported_at_once_with_field_paths():
    bad = {
        "model": {"path": "x", "dtype": "float64"},
        "data": {"train": []},
        "context": {"target_length": -5},
        "training": {"micro_batch_size": 0, "learnin_rate": 1e-3},
    }
    with pytest.raises(RecipeError) as info:
        parse_recipe(bad, "bad.yaml")
    paths = {p for p, _ in info.value.problems}
    assert {"model.dtype", "data.train", "context.target_length", "training.micro_batch_size",
            "training.learnin_rate"} <= paths
    assert "bad.yaml" in str(info.value)


def test_missing_required_sections():
    with pytest.raises(RecipeError) as info:
        parse_recipe({}, "empty")
    assert {"model", "data", "context"} <= {p for p, _ in info.value.problems}


def test_target_must_exceed_base():
    with pytest.raises(RecipeError, match="target_length"):
        parse_recipe({"model": {"path": "m"}, "data": {"train": "a.jsonl"},
                      "context": {"target_length": 100, "base_length": 200}})


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(RecipeError, match="line"):
        load_recipe(p)


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_run_id_must_be_plain_name():
    with pytest.raises(RecipeError, match="run.run_id"):
        parse_recipe({"model": {"path": "m"}, "data": {"train": "a"}, "context": {"target_length": 10},
                      "run": {"run_id": "../escape"}})


@pytest.mark.parametrize("run", [{"run_id": "my run"}, {"run_id": "a..b"}, {"run_id": "x" * 65},
                                 {"name": "my run"}, {"name": "x" * 49}, {"name": ".hidden"}])
def test_names_that_cannot_become_the_run_folder_are_refused_by_validate(run):
    """What run_record.check_run_id would refuse after approval is refused when the recipe loads."""
    with pytest.raises(RecipeError, match=f"run.{next(iter(run))}"):
        parse_recipe({"model": {"path": "m"}, "data": {"train": "a"}, "context": {"target_length": 10}, "run": run})
    ok = parse_recipe({"model": {"path": "m"}, "data": {"train": "a"}, "context": {"target_length": 10},
                       "run": {"name": "x" * 48, "run_id": "y" * 64}})
    from scaler_wizard.run_record import check_run_id, generated_run_id

    assert check_run_id(generated_run_id(ok.run.name)) and check_run_id(ok.run.run_id)


def test_digest_is_canonical():
    a = parse_recipe(yaml.safe_load("model: {path: m}\ndata: {train: a}\ncontext: {target_length: 10}"))
    b = parse_recipe({"context": {"target_length": 10}, "data": {"train": ["a"]}, "model": {"path": "m"}})
    assert a.digest() == b.digest()
    c = parse_recipe({"context": {"target_length": 11}, "data": {"train": ["a"]}, "model": {"path": "m"}})
    assert a.digest() != c.digest()
