"""telemetry.mirrors reaches the Trainer's report_to (TensorBoard / MLflow / W&B through
transformers' own integrations); unknown mirrors are recipe errors."""

from __future__ import annotations

import pytest


def _recipe(**telemetry):
    from scaler_wizard.recipe import parse_recipe

    return parse_recipe({"model": {"path": "m"}, "data": {"train": ["d.jsonl"]},
                         "context": {"target_length": 512}, "telemetry": telemetry}, "r.yaml")


def test_mirrors_become_report_to(tmp_path):
    from scaler_wizard.training.stage_trainer import training_arguments

    assert training_arguments(_recipe(), 3, tmp_path, 0).report_to == []
    args = training_arguments(_recipe(mirrors=["tensorboard", "mlflow"]), 3, tmp_path, 0)
    assert args.report_to == ["tensorboard", "mlflow"]


def test_unknown_mirror_is_a_recipe_error():
    from scaler_wizard.errors import RecipeError

    with pytest.raises(RecipeError, match="telemetry.mirrors"):
        _recipe(mirrors=["splunk"])
