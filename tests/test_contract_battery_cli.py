"""Issue 14 battery, driven through the real command line (`scaler-wizard run RECIPE --contract
FILE`, or `contract draft/verify`): each class of bypass from the hostile review, with at least
three variants of our own each. Every case must be refused with a clean message (exit 3, or 2 for
usage errors), take 0 training steps, create nothing outside runs/ and run no drop-in probe code.
The cases that need the pipeline to use the gatekeeper's new APIs are in
test_contract_battery_run.py (xfail until wired)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from sw_run_helpers import (
    RUN_ID,
    assert_refused,
    invoke,
    make_project,
    run_dirs,
    tiny_model_template,
    training_steps,
)

from scaler_wizard.safety import contract as C
from scaler_wizard.safety import gatekeeper as G

__all__ = ["tiny_model_template"]


@pytest.fixture
def project(tmp_path, tiny_model_template, monkeypatch, capsys):
    return make_project(tmp_path, tiny_model_template, monkeypatch, capsys)


def test_control_an_approved_contract_runs(project):
    """The control group: the same harness with an untouched contract trains and completes."""
    t = time.time()
    result = project.run()
    assert result.rc == 0, result.text[-3000:]
    (run_dir,) = run_dirs(project)
    assert run_dir.name == RUN_ID and training_steps(run_dir) > 0
    print(f"full tiny run: {time.time() - t:.1f} s")


# ------------------------------------------------------------------------------------------
# 1. Scope holes: every file that decides what is trained or evaluated is bound
# ------------------------------------------------------------------------------------------


def _permute_tokenizer(path: Path) -> None:
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    names = sorted(vocab, key=vocab.get)[50:250]  # 200 ids permuted
    ids = [vocab[n] for n in names]
    for n, i in zip(names, ids[1:] + ids[:1]):
        vocab[n] = i
    path.write_text(json.dumps(tok))


SCOPE_HOLES = {
    "tokenizer.json: 200 ids permuted": lambda p: _permute_tokenizer(p.model / "tokenizer.json"),
    "tokenizer_config.json: chat template added": lambda p: (p.model / "tokenizer_config.json").write_text(
        json.dumps({**json.loads((p.model / "tokenizer_config.json").read_text()),
                    "chat_template": "{{ 'pwned' }}"})),
    "chat_template.jinja dropped into the model folder": lambda p: (p.model / "chat_template.jinja").write_text(
        "{{ 'pwned' }}"),
    "generation_config.json changed": lambda p: (p.model / "generation_config.json").write_text(
        json.dumps({"max_new_tokens": 99999})),
    "special_tokens_map.json added": lambda p: (p.model / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "the"})),
}


@pytest.mark.parametrize("name", list(SCOPE_HOLES))
def test_scope_hole_model_folder_file_changed_after_signing(project, name):
    before = project.tree_outside_runs()
    SCOPE_HOLES[name](project)
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"changed after the contract was signed|added after signing",
                   before=before)


def test_scope_hole_teacher_weights_changed_after_signing(tmp_path, tiny_model_template, monkeypatch, capsys):
    project = make_project(tmp_path, tiny_model_template, monkeypatch, capsys, teacher=True)
    weights = project.root / "teacher" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x40
    weights.write_bytes(bytes(raw))
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"teacher teacher/model.safetensors changed", before=before)


def test_scope_hole_teacher_tokenizer_changed_after_signing(tmp_path, tiny_model_template, monkeypatch, capsys):
    project = make_project(tmp_path, tiny_model_template, monkeypatch, capsys, teacher=True)
    _permute_tokenizer(project.root / "teacher" / "tokenizer.json")
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"teacher teacher/tokenizer.json changed", before=before)


def test_scope_hole_offline_cache_changed_after_signing(tmp_path, tiny_model_template, monkeypatch, capsys):
    project = make_project(tmp_path, tiny_model_template, monkeypatch, capsys, cache=True)
    (project.root / "cache" / "topk-00000.safetensors").write_bytes(b"\1" * 64)
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"distill_cache cache/topk-00000.safetensors changed", before=before)


def test_scope_hole_probe_code_replaced_after_signing(tmp_path, tiny_model_template, monkeypatch, capsys):
    project = make_project(tmp_path, tiny_model_template, monkeypatch, capsys, probes=True)
    path = project.root / "probes" / "marker_probe.py"
    path.write_text(path.read_text().replace('"probe code ran"', '"replaced probe code ran"'))
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"probe_code probes/marker_probe.py changed", before=before)


def test_scope_hole_probe_file_added_after_signing(tmp_path, tiny_model_template, monkeypatch, capsys):
    project = make_project(tmp_path, tiny_model_template, monkeypatch, capsys, probes=True)
    (project.root / "probes" / "extra.py").write_text("import os\nos.system('true')\n")
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"probe_code probes/extra.py was not part of the approved scope",
                   before=before)


def test_scope_hole_symlink_planted_in_model_folder(project):
    outside = project.tmp / "evil-tokenizer.json"
    shutil.copy(project.model / "tokenizer.json", outside)
    (project.model / "tokenizer.json").unlink()
    os.symlink(outside, project.model / "tokenizer.json")
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"symbolic link", before=before)


# ------------------------------------------------------------------------------------------
# 2. Code before approval: drop-in probe code never runs for a refused run
# ------------------------------------------------------------------------------------------


@pytest.fixture
def probe_project(tmp_path, tiny_model_template, monkeypatch, capsys):
    return make_project(tmp_path, tiny_model_template, monkeypatch, capsys, probes=True)


def test_code_before_approval_no_contract(probe_project):
    before = probe_project.tree_outside_runs()
    assert_refused(probe_project, probe_project.run(contract=False), r"No contract for this run", before=before)


def test_code_before_approval_unsigned_contract(probe_project):
    probe_project.contract_path.write_text(C.dump_contract(probe_project.draft()))
    before = probe_project.tree_outside_runs()
    assert_refused(probe_project, probe_project.run(), r"no signatures", before=before)


def test_code_before_approval_untrusted_signer(probe_project):
    probe_project.sign(probe_project.draft(authorized_by=["alice", "mallory"]), "mallory")
    before = probe_project.tree_outside_runs()
    assert_refused(probe_project, probe_project.run(), r"not a trusted approver key", before=before)


def test_code_before_approval_self_approval_forbidden(probe_project):
    before = probe_project.tree_outside_runs()
    assert_refused(probe_project, probe_project.run("--self-approve", contract=False),
                   r"Self-approval is not allowed", before=before)


# ------------------------------------------------------------------------------------------
# 3. Replay: a contract authorises one run, wherever and whatever happened to runs/
# ------------------------------------------------------------------------------------------


def _consume(project) -> None:
    """Use the contract once: authorised by the gate (the run that follows is not needed here;
    test_replay_after_a_real_completed_run does the whole thing)."""
    recipe, folder = project.recipe()
    G.authorize_run(recipe, folder, run_id=RUN_ID, run_dir=project.tmp / "elsewhere" / RUN_ID,
                    contract_path=project.contract_path, echo=lambda s: None)


def test_replay_after_a_real_completed_run(project):
    assert project.run().rc == 0
    shutil.rmtree(project.runs)  # the run folder's own audit trail is gone
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"was already used", before=before)


def test_replay_from_another_working_folder(project, monkeypatch):
    _consume(project)
    copy = project.tmp / "copy"
    shutil.copytree(project.root, copy)
    monkeypatch.chdir(copy)
    before = project.tree_outside_runs()
    assert_refused(project, project.run(recipe=copy / "recipe.yaml"), r"was already used", before=before)


def test_replay_after_rm_runs(project):
    _consume(project)
    shutil.rmtree(project.runs, ignore_errors=True)
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"was already used", before=before)


def test_replay_with_the_signature_detached(project):
    _consume(project)
    doc = C.load_contract(project.contract_path)
    project.contract_path.write_text(C.dump_contract(doc, with_signatures=False))
    C.detached_path(project.contract_path).write_text(C.dump_detached(doc))
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"was already used", before=before)


def test_replay_after_the_ledger_folder_is_replaced_by_a_symlink(project):
    _consume(project)
    state = G.state_home()
    target = project.tmp / "fake-state"
    target.mkdir()
    ledger = state / G.LEDGER_NAME
    shutil.move(ledger, project.tmp / "moved-ledger")
    os.symlink(project.tmp / "empty-ledger", ledger)  # a dangling link where the ledger was
    before = project.tree_outside_runs()
    result = project.run()
    assert_refused(project, result, r"symbolic link|cannot be opened|Cannot write", before=before)


# ------------------------------------------------------------------------------------------
# 4. Trust override: a project file can only restrict
# ------------------------------------------------------------------------------------------


def _project_file(project, **doc) -> Path:
    path = project.root / C.PROJECT_APPROVERS_FILE
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_trust_override_project_file_trusts_an_outsider(project):
    _project_file(project, approvers=[{"name": "mallory", "public_key": project.keys["mallory"].public_key}])
    project.sign(project.draft(authorized_by=["alice", "mallory"]), "mallory")
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"not a trusted approver key", before=before)


def test_trust_override_project_file_cannot_unrevoke(project):
    C.revoke_key(project.user_approvers, project.keys["alice"].key_id, "laptop stolen")
    _project_file(project, approvers=[{"name": "alice", "public_key": project.keys["alice"].public_key}], revoked=[])
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"revoked", before=before)


def test_trust_override_project_file_cannot_allow_self_approval(project):
    doc = C.read_approvers_file(project.user_approvers)
    C.write_approvers_file(project.user_approvers, doc.model_copy(update={"allow_self_approval": False}))
    _project_file(project, allow_self_approval=True)
    before = project.tree_outside_runs()
    assert_refused(project, project.run("--self-approve", contract=False), r"Self-approval is not allowed",
                   before=before)


def test_trust_override_project_file_cannot_lengthen_validity(project):
    doc = C.read_approvers_file(project.user_approvers)
    C.write_approvers_file(project.user_approvers, doc.model_copy(update={"max_validity_days": 2}))
    _project_file(project, max_validity_days=3650)
    project.sign(project.draft(valid_for=C.timedelta(days=5)))
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"longer than the maximum of 2 days", before=before)


def test_trust_restriction_from_the_project_file_applies(project):
    _project_file(project, required_signatures=2)
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"needs 2", before=before)


def test_contract_verify_and_run_agree_and_name_the_files(project, capsys):
    _project_file(project, approvers=[{"name": "mallory", "public_key": project.keys["mallory"].public_key}])
    project.sign(project.draft(authorized_by=["alice", "mallory"]), "mallory")
    verify = invoke(["scaler-wizard", "contract", "verify", str(project.contract_path), "--recipe",
                     str(project.recipe_path)], capsys)
    assert verify.rc == 3 and "not a trusted approver key" in verify.err
    assert str(project.user_approvers) in verify.out and "project: restrictions only" in verify.out
    assert "not trusted by the user's file: ignored" in verify.out
    run = project.run()
    assert run.rc == 3 and "not a trusted approver key" in run.err
    assert str(project.user_approvers) in run.err and "project: restrictions only" in run.err


# ------------------------------------------------------------------------------------------
# 6. Paths from the contract: session_id is a name, never a path
# ------------------------------------------------------------------------------------------


def _signed_with_session(project, session_id: str) -> None:
    """A contract *properly signed* whose session_id is a path (built without validation)."""
    good = project.draft()
    body = C.ContractBody.model_construct(**{**dict(good.body), "session_id": session_id})
    doc = C.Contract.model_construct(body=body, signatures=())
    project.sign(doc, "alice")


@pytest.mark.parametrize("session_id", ["../escaped", "/tmp/sw-abs-escape", "a/b", "..", "run-1/../../x",
                                        ".hidden", "x" * 65])
def test_session_id_that_is_a_path_is_refused_and_nothing_is_written_outside(project, session_id):
    _signed_with_session(project, session_id)
    before = project.tree_outside_runs()
    result = project.run()
    assert_refused(project, result, r"session_id must be a plain run name", before=before)
    assert not Path("/tmp/sw-abs-escape").exists()
    for d in run_dirs(project):
        assert d.parent == project.runs


# ------------------------------------------------------------------------------------------
# 7. Parsing: regular files only, no merge keys or anchors, bounded validity
# ------------------------------------------------------------------------------------------


def test_parsing_merge_key_beside_signed_keys(project):
    text = project.contract_path.read_text()
    project.contract_path.write_text(text + "<<: {max_steps: 999999}\n")
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"merge keys", before=before)


def test_parsing_nested_merge_key_in_scope(project):
    text = project.contract_path.read_text()
    project.contract_path.write_text(text.replace("scope:\n", "scope:\n  <<: {max_tokens: 1}\n", 1))
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"merge keys", before=before)


def test_parsing_anchor_on_a_signed_value(project):
    text = project.contract_path.read_text()
    project.contract_path.write_text(text.replace("rollback_plan:", "rollback_plan: &plan", 1))
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"anchors", before=before)


def test_parsing_contract_is_a_directory(project):
    folder = project.tmp / "contract-dir"
    folder.mkdir()
    before = project.tree_outside_runs()
    assert_refused(project, project.run(contract=folder), r"is a directory", before=before)


def test_parsing_contract_is_a_fifo_does_not_hang(project):
    fifo = project.tmp / "contract-fifo"
    os.mkfifo(fifo)
    before = project.tree_outside_runs()
    done: dict = {}
    t = threading.Thread(target=lambda: done.setdefault("r", project.run(contract=fifo)), daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():  # unblock the reader so the test process can end, then fail
        with open(fifo, "wb") as fh:
            fh.write(b"x")
        pytest.fail("run --contract FIFO hangs")
    assert_refused(project, done["r"], r"FIFO", before=before)


def test_parsing_contract_is_a_device(project):
    before = project.tree_outside_runs()
    assert_refused(project, project.run(contract=Path("/dev/zero")), r"device", before=before)


def test_parsing_contract_is_a_symlink(project):
    link = project.tmp / "contract-link.yaml"
    os.symlink(project.contract_path, link)
    before = project.tree_outside_runs()
    assert_refused(project, project.run(contract=link), r"symbolic link", before=before)


@pytest.mark.parametrize("days", ["3000000", "1e12", "91", "nan", "inf"])
def test_parsing_draft_valid_days_beyond_the_maximum_is_a_clean_error(project, days):
    out = project.tmp / f"draft-{days}.yaml"
    result = invoke(["scaler-wizard", "contract", "draft", str(project.recipe_path), "--out", str(out),
                     "--approver", "alice", "--valid-days", days], project.capsys)
    assert result.rc in (2, 3) and "Traceback" not in result.text, result.text
    assert "maximum" in result.err or "valid" in result.err.lower()
    assert not out.exists()


def test_parsing_signed_contract_longer_than_the_maximum_validity(project):
    doc = project.draft(valid_for=C.timedelta(days=90))
    body = C.ContractBody.model_construct(**{**dict(doc.body), "expires_at": "2999-01-01T00:00:00Z"})
    project.sign(C.Contract.model_construct(body=body, signatures=()), "alice")
    before = project.tree_outside_runs()
    assert_refused(project, project.run(), r"longer than the maximum of 90 days", before=before)


# ------------------------------------------------------------------------------------------
# 8. Ceremony: self-approval off by default where the user keeps a trust list; no secrets
# ------------------------------------------------------------------------------------------


def test_ceremony_self_approval_off_once_the_user_keeps_approvers(project):
    before = project.tree_outside_runs()
    assert_refused(project, project.run("--self-approve", contract=False), r"Self-approval is not allowed",
                   before=before)


def test_ceremony_self_approval_with_two_signatures_required(project):
    doc = C.read_approvers_file(project.user_approvers)
    C.write_approvers_file(project.user_approvers,
                           doc.model_copy(update={"allow_self_approval": True, "required_signatures": 2}))
    before = project.tree_outside_runs()
    assert_refused(project, project.run("--self-approve", contract=False), r"requires 2 signatures", before=before)


def test_ceremony_audit_files_are_private_and_hold_no_secrets(project):
    project.sign(project.draft(), "alice")
    result = project.run()
    assert result.rc == 0, result.text[-2000:]
    (run_dir,) = run_dirs(project)
    audit = G.audit_path(run_dir)
    assert audit.stat().st_mode & 0o777 == 0o600
    assert (run_dir / "contract" / "contract.yaml").stat().st_mode & 0o777 == 0o600
    text = audit.read_text()
    sig = C.load_contract(project.contract_path).signatures[0].signature
    assert sig not in text and "v4.public." not in text and "PRIVATE KEY" not in text
    assert not (run_dir / "contract" / "approval_token").exists()
    events = [json.loads(x)["event"] for x in text.splitlines()]
    assert events[:2] == ["contract_verified", "grant_issued"] and events[-1] == "run_closed"
    ledger = G.state_home() / G.LEDGER_NAME
    assert ledger.stat().st_mode & 0o777 == 0o600


def test_ceremony_explicit_self_approval_without_any_trust_file_still_works(project):
    """The demo path: no approvers file at all, `--self-approve` explicitly."""
    project.user_approvers.unlink()
    result = project.run("--self-approve", contract=False)
    assert result.rc == 0, result.text[-2000:]
    assert "SELF-APPROVAL" in result.err


# ------------------------------------------------------------------------------------------
# 13. Unknown CLI options: usage error, exit 2, no traceback
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["cockpit", "--no-browser"], ["contract", "draft", "--nope"],
                                  ["contract", "verify"], ["run", "--contract"], ["cockpit", "--port", "notaport"]])
def test_unknown_or_malformed_options_are_usage_errors(argv, capsys):
    result = invoke(["scaler-wizard", *argv], capsys)
    assert result.rc == 2, result.text
    assert "Traceback" not in result.text and ("Error" in result.err or "error" in result.err)


def test_unknown_option_through_the_installed_entry_point():
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("scaler-wizard")
    proc = subprocess.run([str(exe), "cockpit", "--no-browser"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "No such option" in proc.stderr and "Traceback" not in proc.stderr
