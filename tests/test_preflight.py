"""One preflight for `validate` and `run`: schema and meaning, every problem at once, nothing
written; drop-in probe files parsed, never executed, before the approval."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import write_recipe


def _validate(path, cwd):
    return subprocess.run([sys.executable, "-m", "scaler_wizard", "validate", str(path)], capture_output=True,
                          text=True, cwd=cwd, timeout=240)


def test_validate_reports_bad_method_params_and_strategy_options_together(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs",
                          context__method_params={"beta_fast": 4, "warp": 9},
                          scaling={"strategy": "block_expansion", "block_expansion": {"new_blocks": 99}})
    res = _validate(recipe, tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    out = " ".join((res.stdout + res.stderr).split())
    assert "context.method_params" in out and "warp" in out
    assert "scaling.block_expansion" in out and "new block" in out
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_validate_ok_names_the_stages(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs", context__schedule=[128, 256])
    res = _validate(recipe, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "64 -> 128 -> 256" in res.stdout


def test_dropin_probe_code_is_parsed_not_run_before_approval(tmp_path, tiny_model_dir):
    from scaler_wizard.errors import ContractError
    from scaler_wizard.pipeline import run

    probes = tmp_path / "probes"
    probes.mkdir()
    marker = tmp_path / "probe-code-ran"
    (probes / "p.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "class Mine:\n    name = 'mine'\n    def run(self, model, length, ctx):\n        raise RuntimeError\n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs",
                          evaluation__probe_dirs=[str(probes)], evaluation__custom=[{"name": "mine"}])
    with pytest.raises(ContractError):
        run(recipe)  # no approval
    assert not marker.exists()
    bad = write_recipe(tmp_path / "bad.yaml", tiny_model_dir, tmp_path / "runs2",
                       evaluation__probe_dirs=[str(probes)], evaluation__custom=[{"name": "nope"}])
    res = _validate(bad, tmp_path)
    assert res.returncode == 2 and "evaluation.custom[0].name" in res.stdout + res.stderr
    assert not marker.exists()
