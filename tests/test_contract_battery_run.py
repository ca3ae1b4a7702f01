"""Issue 14 cases that need the pipeline to use the gatekeeper's APIs: time-of-check/time-of-use
swaps at the moment that matters (the run loads private copies of the approved bytes and checks
the data bytes it parsed), the work budget across rollbacks (charged before every optimizer
step), and the stage check with token counts, data hash and a re-hash of the bound files. Each
is driven through `scaler-wizard run`."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from sw_run_helpers import (
    assert_refused,
    audit_records,
    make_project,
    patch_after_authorization,
    patch_before_authorization,
    run_dirs,
    tiny_model_template,
    training_steps,
)

__all__ = ["tiny_model_template"]



@pytest.fixture
def project(tmp_path, tiny_model_template, monkeypatch, capsys):
    return make_project(tmp_path, tiny_model_template, monkeypatch, capsys)


def _used_only_approved_bytes(project, result) -> None:
    """Refused by the gate (exit 3: the bytes read are not the approved ones), or ran to the end on
    the approved bytes (exit 0). Exit 2 means the swapped bytes were loaded (and were garbage)."""
    assert result.rc in (0, 3), (result.rc, result.text[-2000:])
    if result.rc == 3:
        assert "changed after the contract was signed" in " ".join(result.err.split())
        assert all(training_steps(d) == 0 for d in run_dirs(project))


# ------------------------------------------------------------------------------------------
# 5. Time of check vs time of use
# ------------------------------------------------------------------------------------------


def test_toctou_weights_swapped_right_after_authorization(project, monkeypatch):
    weights = project.model / "model.safetensors"
    garbage = os.urandom(weights.stat().st_size)
    patch_after_authorization(monkeypatch, lambda grant: weights.write_bytes(garbage))
    _used_only_approved_bytes(project, project.run())


def test_toctou_symlinked_model_folder_repointed_right_after_authorization(project, monkeypatch):
    real = project.root / "model-a"
    project.model.rename(real)
    evil = project.root / "model-b"
    shutil.copytree(real, evil)
    (evil / "model.safetensors").write_bytes(os.urandom((real / "model.safetensors").stat().st_size))
    os.symlink(real, project.model)  # recipe model.path: model -> model-a at signing time
    project.sign()

    def repoint(grant):
        tmp = project.root / "model.tmp"
        os.symlink(evil, tmp)
        os.replace(tmp, project.model)

    patch_after_authorization(monkeypatch, repoint)
    _used_only_approved_bytes(project, project.run())


def test_toctou_tokenizer_swapped_right_after_authorization(project, monkeypatch):
    patch_after_authorization(monkeypatch, lambda g: (project.model / "tokenizer.json").write_text("{not json"))
    _used_only_approved_bytes(project, project.run())


def test_toctou_data_poisoned_while_read_and_restored_before_hashing(project, monkeypatch):
    """The data is read (poisoned), then restored before the gate hashes it: the run must refuse,
    because the bytes it read are not the approved ones."""
    data = project.root / "train.jsonl"
    original = data.read_bytes()
    data.write_text("".join(json.dumps({"text": "POISON " * 50}) + "\n" for _ in range(40)))
    patch_before_authorization(monkeypatch, lambda: data.write_bytes(original))
    result = project.run()
    assert_refused(project, result, r"changed after the contract was signed")


def test_toctou_probe_code_swapped_right_after_authorization(tmp_path, tiny_model_template, monkeypatch, capsys):
    project = make_project(tmp_path, tiny_model_template, monkeypatch, capsys, probes=True)
    evil = tmp_path / "evil-probe-ran.marker"
    code = (project.root / "probes" / "marker_probe.py")
    swapped = code.read_text().replace('os.environ["SW_PROBE_MARKER"]', repr(str(evil)))
    patch_after_authorization(monkeypatch, lambda g: code.write_text(swapped))
    result = project.run()
    assert not evil.exists(), "probe code swapped after approval was executed"
    assert result.rc in (0, 3), result.text[-2000:]


# ------------------------------------------------------------------------------------------
# 8. max_steps bounds work done (rollbacks included), and the stage check gets its inputs
# ------------------------------------------------------------------------------------------


def test_work_budget_is_charged_for_every_optimizer_step(project):
    result = project.run()
    assert result.rc == 0, result.text[-2000:]
    (run_dir,) = run_dirs(project)
    closed = [r for r in audit_records(run_dir) if r["event"] == "run_closed"][-1]
    assert closed["steps_done"] == training_steps(run_dir) > 0
    assert closed["tokens_done"] > 0


def test_work_budget_stops_the_step_that_passes_the_approval(project, monkeypatch):
    """Earlier work (another attempt, a rollback) used all but one approved step: the run takes one
    more step and stops (exit 3), whatever its position counter says."""

    def spend(grant):
        grant.work.steps = grant.work.max_steps - 1

    patch_after_authorization(monkeypatch, spend)
    result = project.run()
    assert result.rc == 3 and "Scope exceeded" in result.err, result.text[-2000:]
    assert all(training_steps(d) <= 1 for d in run_dirs(project))


def test_work_budget_counts_steps_across_a_gate_rollback(tmp_path, tiny_model_template, monkeypatch, capsys):
    """gate_policy rollback with a gate that always fails: stage 1 trains, fails, is retrained from
    its start (the position goes back), fails again. Only 3 steps of work are left in the approval;
    the retry's second step is refused although the position never passes 2."""
    project = make_project(tmp_path, tiny_model_template, monkeypatch, capsys, training__steps_per_stage=2,
                           context__gate_policy="rollback",
                           evaluation__perplexity={"windows": 2, "max_ratio_to_base": 0.0001})
    project.sign()

    def spend(grant):
        grant.work.steps = grant.work.max_steps - 3

    patch_after_authorization(monkeypatch, spend)
    result = project.run()
    assert result.rc == 3 and "Scope exceeded" in result.err, result.text[-2000:]


def test_stage_check_gets_token_counts_data_hash_and_rehashes_files(project):
    result = project.run()
    assert result.rc == 0, result.text[-2000:]
    (run_dir,) = run_dirs(project)
    checks = [r for r in audit_records(run_dir) if r["event"] == "scope_checked"]
    assert checks and all(r.get("stage_tokens") and r.get("files_rechecked") for r in checks), checks


def test_file_changed_between_stages_stops_the_next_stage(project, monkeypatch):
    """A bound file edited while stage 1 trains: stage 2's check re-hashes and stops the run."""
    import scaler_wizard.safety.gatekeeper as G

    real = G.check_scope
    calls = {"n": 0}

    def check(grant, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(project.root / "train.jsonl", "a") as fh:
                fh.write(json.dumps({"text": "late poison"}) + "\n")
        return real(grant, **kw)

    import sys

    for module in list(sys.modules.values()):  # every holder of check_scope, however it was imported
        if getattr(module, "check_scope", None) is real and module.__name__.startswith("scaler_wizard"):
            monkeypatch.setattr(module, "check_scope", check)
    result = project.run()
    assert result.rc == 3 and "changed after the contract was signed" in " ".join(result.err.split()), \
        result.text[-2000:]
