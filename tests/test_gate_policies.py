"""Every gate policy through ``pipeline.run`` on a tiny model with a forced failing gate at
stage 2, the verdict of a gates-failed run (status, summary, exit code, report), the safety
envelope's evaluation telegrams acting, and the per-task losses in metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import write_recipe

SCHEDULE = [128, 256]


def _recipe(tmp_path, model_dir, name, **overrides):
    return write_recipe(tmp_path / f"{name}.yaml", model_dir, tmp_path / "runs", run__run_id=name,
                        context__schedule=SCHEDULE, training__steps_per_stage=3, **overrides)


def _fail_stage_two(monkeypatch):
    from scaler_wizard.training import stage_loop

    real = stage_loop.gate
    monkeypatch.setattr(stage_loop, "gate", lambda stage, results, base_ppl: (
        ["forced failure"] if stage.index == 2 else real(stage, results, base_ppl)))


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stage_probe(outcome, probe):
    return next(p for p in outcome["probes"] if p["probe"] == probe)["metrics"]


@pytest.mark.parametrize("policy", ["stop", "rollback"])
def test_stop_and_rollback_end_at_the_last_passed_pair(tmp_path, tiny_model_dir, monkeypatch, policy):
    from scaler_wizard.pipeline import run

    _fail_stage_two(monkeypatch)
    result = run(_recipe(tmp_path, tiny_model_dir, policy, context__gate_policy=policy), self_approve=True)
    s, d = result.summary, result.run_dir
    assert [o["decision"] for o in s["stages"]] == ["pass", policy]
    assert s["verdict"] == "gates_failed" and "forced failure" in " ".join(s["verdict_reasons"])
    assert json.loads((d / "status.json").read_text())["state"] == "completed_gates_failed"
    assert s["reached_length"] == 128
    # the exported model is stage 1's pair: its position encoding ...
    config = json.loads((d / "model" / "config.json").read_text())
    assert config["max_position_embeddings"] == 128
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 2.0
    # ... and its weights: the final figures at 128 equal what stage 1's gate evaluated
    stage1 = s["stages"][0]
    assert s["final"]["perplexity@128"] == pytest.approx(_stage_probe(stage1, "perplexity")["perplexity"], rel=1e-6)
    assert s["export_check"]["max_abs_logit_diff"] < 1e-4
    names = [e["metric"] for e in _events(d)]
    if policy == "rollback":  # one retry from the stage-start snapshot, then the end
        assert names.count("gate/retry") == 1 and s["stages"][1]["steps_trained"] == 6
    else:
        assert "gate/retry" not in names and s["stages"][1]["steps_trained"] == 3
    assert "gate/ended_at_length" in names


def test_extend_trains_the_stage_once_more_then_stops(tmp_path, tiny_model_dir, monkeypatch):
    from scaler_wizard.pipeline import run

    _fail_stage_two(monkeypatch)
    result = run(_recipe(tmp_path, tiny_model_dir, "extend", context__gate_policy="extend"), self_approve=True)
    s = result.summary
    assert [o["decision"] for o in s["stages"]] == ["pass", "stop"]
    assert s["stages"][1]["steps_trained"] == 6 and s["total_steps"] == 9
    assert [e["metric"] for e in _events(result.run_dir)].count("gate/extend") == 1
    assert s["verdict"] == "gates_failed" and s["reached_length"] == 128


def test_continue_goes_on_but_the_verdict_is_gates_failed(tmp_path, tiny_model_dir, monkeypatch):
    from scaler_wizard.pipeline import run

    _fail_stage_two(monkeypatch)
    result = run(_recipe(tmp_path, tiny_model_dir, "cont", context__gate_policy="continue",
                         data__synthetic_passkey_share=0.5), self_approve=True)
    s = result.summary
    assert [o["decision"] for o in s["stages"]] == ["pass", "continue"]
    assert s["verdict"] == "gates_failed" and s["reached_length"] == 256
    report = (result.run_dir / "report" / "report.html").read_text()
    assert "GATES FAILED" in report.split("<h1")[1][:400]  # the first thing the report says
    events = _events(result.run_dir)
    assert {"train/loss", "train/loss/lm", "train/loss/retrieval", "train/retrieval_token_acc"} <= {
        e["metric"] for e in events}


def test_all_gates_passing_is_a_passed_verdict(tmp_path, tiny_model_dir):
    from scaler_wizard.pipeline import run

    result = run(_recipe(tmp_path, tiny_model_dir, "ok", context__gate_policy="stop"), self_approve=True)
    assert result.summary["verdict"] == "passed" and result.summary["reached_length"] == 256
    assert json.loads((result.run_dir / "status.json").read_text())["state"] == "completed"


@pytest.mark.parametrize("on_stop", ["halt", "rollback"])
def test_evaluation_telegrams_act(tmp_path, tiny_model_dir, on_stop):
    """An accuracy floor the tiny model cannot meet: the envelope's stop halts the run, or
    rolls the stage back until the rollback budget is spent and then halts."""
    from scaler_wizard.errors import RunHalted
    from scaler_wizard.pipeline import run

    recipe = _recipe(tmp_path, tiny_model_dir, f"floor-{on_stop}",
                     safety={"accuracy_floors": {"probe/passkey@*": 0.99},
                             "policy": {"on_stop": on_stop, "max_rollbacks": 1}})
    with pytest.raises(RunHalted, match="passkey"):
        run(recipe, self_approve=True)
    d = tmp_path / "runs" / f"floor-{on_stop}"
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "failed" and not (d / "summary.json").exists()
    rollbacks = [e for e in _events(d) if e["metric"] == "safety/rollback"]
    assert len(rollbacks) == (1 if on_stop == "rollback" else 0)


def test_cli_exit_code_and_red_verdict_of_a_gates_failed_run(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, "cli", context__gate_policy="stop",
                     evaluation={"passkey": {"trials": 2, "depths": [0.5], "min_accuracy": 1.0},
                                 "perplexity": {"windows": 1}})
    res = subprocess.run([sys.executable, "-m", "scaler_wizard", "run", str(recipe), "--self-approve"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 5, res.stderr[-2000:]
    assert "GATES FAILED" in res.stdout and "Traceback" not in res.stderr
    d = tmp_path / "runs" / "cli"
    assert json.loads((d / "summary.json").read_text())["verdict"] == "gates_failed"
    assert json.loads((d / "status.json").read_text())["state"] == "completed_gates_failed"
