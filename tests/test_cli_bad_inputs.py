"""Bad input: one-paragraph error naming the problem, exit code 2, no run directory left."""

import subprocess
import sys

import pytest
from conftest import write_recipe


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scaler_wizard", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=240)


def test_validate_ok_and_bad(tmp_path):
    ok = cli("validate", "src/scaler_wizard/recipes/demo.yaml")
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: m}\ndata: {train: []}\ncontext: {target_length: 0}\ntraining: {foo: 1}\n")
    res = cli("validate", str(bad))
    assert res.returncode == 2
    for field in ("data.train", "context.target_length", "training.foo"):
        assert field in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("case", ["no_model", "pickle_only", "bad_config", "no_data", "bad_jsonl", "no_field"])
def test_run_bad_inputs_exit_2_and_leave_nothing(tmp_path, tiny_model_dir, case):
    model_dir, data = tiny_model_dir, None
    if case == "no_model":
        model_dir = tmp_path / "missing-model"
    elif case == "pickle_only":
        model_dir = tmp_path / "pk"
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")
        (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    elif case == "bad_config":
        (tiny_model_dir / "config.json").write_text("{not json")
    elif case == "no_data":
        data = [str(tmp_path / "absent.jsonl")]
    elif case == "bad_jsonl":
        p = tmp_path / "bad.jsonl"
        p.write_text('{"text": "ok"}\n{broken\n')
        data = [str(p)]
    elif case == "no_field":
        p = tmp_path / "nofield.jsonl"
        p.write_text('{"body": "hello"}\n')
        data = [str(p)]
    kwargs = {"data__train": data} if data else {}
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, tmp_path / "runs", **kwargs)
    res = cli("run", str(recipe))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "error:" in res.stderr and "Traceback" not in res.stderr
    expected = {"no_model": "does not exist", "pickle_only": "safetensors", "bad_config": "config.json",
                "no_data": "absent.jsonl", "bad_jsonl": "bad.jsonl", "no_field": "no 'text' field"}[case]
    assert expected in " ".join(res.stderr.split())
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_unsupported_method_names_supported_ones(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs", context__method="learned_table")
    res = cli("run", str(recipe))
    assert res.returncode == 2
    assert "yarn" in res.stderr and "does not support rope" in " ".join(res.stderr.split())


def test_resume_bad_requests_exit_2(tmp_path):
    both = cli("run", "some.yaml", "--resume", "some-run", cwd=tmp_path)
    assert both.returncode == 2 and "--resume" in both.stderr and "Traceback" not in both.stderr
    missing = cli("run", "--resume", str(tmp_path / "nope"), "--self-approve", cwd=tmp_path)
    assert missing.returncode == 2 and "No run folder" in missing.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
