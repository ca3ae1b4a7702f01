import json

import pytest
from conftest import ROOT, write_recipe

from scaler_wizard.errors import PluginError
from scaler_wizard.evaluation.registry import discover_probes
from scaler_wizard.pipeline import run

DROPINS = ROOT / "tests" / "probe_dropins"


def test_discovers_builtins_and_dropin_folder(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.py").write_text("raise ImportError('nope')\n")
    with pytest.warns(UserWarning, match="bad.py"):
        catalog = discover_probes([DROPINS, broken, tmp_path / "missing"])
    assert {"perplexity", "passkey", "short_context", "mean_logit", "exploding"} <= set(catalog.classes)
    assert any("missing" in p for p in catalog.problems)
    with pytest.raises(PluginError, match="available: .*exploding.*mean_logit.*passkey"):
        catalog.create("nope")
    with pytest.raises(PluginError, match="options"):
        catalog.create("mean_logit", wrong=1)


def test_custom_probes_run_after_each_stage_and_a_failing_one_does_not_crash(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs", training__steps_per_stage=2,
                          evaluation__probe_dirs=[str(DROPINS)],
                          evaluation__custom=[{"name": "mean_logit", "options": {"tokens": 8}}, {"name": "exploding"}])
    result = run(recipe, self_approve=True)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    names = {e["metric"] for e in events}
    assert {"probe/mean_logit/mean@128", "probe/mean_logit/mean@256"} <= names
    errors = [e for e in events if e["metric"].startswith("probe_error/exploding")]
    assert len(errors) == 2 and "boom" in errors[0]["error"]
