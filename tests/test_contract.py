"""Human Contract Gatekeeper: keys, canonical form, signing, k-of-n, happy paths, self-approval,
scope checks and the audit trail. The tampering battery is test_contract_battery.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from scaler_wizard.errors import ContractError
from scaler_wizard.recipe import load_recipe
from scaler_wizard.safety import contract as C
from scaler_wizard.safety import gatekeeper as G


def make_project(root: Path, **training) -> Path:
    """A recipe with a tiny safetensors 'model' (config + one weight file) and one data file."""
    model = root / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
    save_file({"w": np.arange(16, dtype=np.float32).reshape(4, 4)}, str(model / "model.safetensors"))
    (root / "train.jsonl").write_text('{"text": "In the beginning God created the heaven and the earth."}\n')
    recipe = {
        "run": {"name": "t", "output_dir": "runs"},
        "model": {"path": "model"},
        "data": {"train": ["train.jsonl"]},
        "context": {"target_length": 1024, "schedule": [512, 1024]},
        "training": {"steps_per_stage": [3, 4], "micro_batch_size": 2, **training},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(C.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.delenv(C.APPROVERS_ENV, raising=False)
    monkeypatch.delenv(C.PASSPHRASE_ENV, raising=False)
    return tmp_path / "home"


@pytest.fixture
def project(tmp_path, home):
    recipe_path = make_project(tmp_path / "proj")
    recipe, folder = load_recipe(recipe_path)
    keys = {n: C.generate_keypair(n, tmp_path / "keys") for n in ("alice", "bob", "carol")}
    approvers = tmp_path / "approvers.yaml"
    for n, k in keys.items():
        C.add_trusted_approver(approvers, n, k.public_key)
    return recipe, folder, keys, approvers


def _signed(recipe, folder, keys, names=("alice",), *, authorized=("alice", "bob", "carol"), k=1, run_id="run-1"):
    doc = C.draft_contract(recipe, folder, authorized_by=list(authorized), required_signatures=k, run_id=run_id)
    for n in names:
        doc = C.sign_contract(doc, C.load_private_key(keys[n].private), n)
    return doc


# ----- keys -------------------------------------------------------------------------------


def test_keygen_writes_0600_key_and_refuses_overwrite(tmp_path):
    files = C.generate_keypair("dana", tmp_path)
    assert files.private.stat().st_mode & 0o777 == 0o600
    assert files.public.read_text().startswith("ed25519:")
    assert C.key_id(C.parse_public_key(files.public.read_text())) == files.key_id
    with pytest.raises(ContractError, match="never overwritten"):
        C.generate_keypair("dana", tmp_path)


def test_passphrase_protected_key(tmp_path, monkeypatch):
    monkeypatch.delenv(C.PASSPHRASE_ENV, raising=False)
    files = C.generate_keypair("erin", tmp_path, passphrase="correct horse")
    assert C.private_key_is_encrypted(files.private)
    with pytest.raises(ContractError, match="encrypted and no passphrase"):
        C.load_private_key(files.private)
    with pytest.raises(ContractError, match="wrong passphrase"):
        C.load_private_key(files.private, "wrong")
    assert C.key_id(C.load_private_key(files.private, "correct horse").public_key()) == files.key_id
    monkeypatch.setenv(C.PASSPHRASE_ENV, "correct horse")
    assert C.key_id(C.load_private_key(files.private).public_key()) == files.key_id


def test_key_readable_by_others_is_refused(tmp_path):
    files = C.generate_keypair("frank", tmp_path)
    os.chmod(files.private, 0o644)
    with pytest.raises(ContractError, match="chmod 600"):
        C.load_private_key(files.private)


# ----- canonical form ------------------------------------------------------------------------


def test_canonical_digest_ignores_yaml_layout_but_not_values(project):
    recipe, folder, keys, approvers = project
    doc = _signed(recipe, folder, keys)
    text = C.dump_contract(doc)
    data = yaml.safe_load(text)
    # same content, different layout: flow style, reversed key order, comments
    relaid = "# a comment\n" + yaml.safe_dump(dict(reversed(list(data.items()))), default_flow_style=True)
    again = C.parse_contract(relaid, "relaid")
    assert again.digest() == doc.digest()
    C.verify_contract(again, C.load_trust_policy(approvers))
    data["scope"]["max_steps"] += 1
    assert C.parse_contract(yaml.safe_dump(data)).digest() != doc.digest()


def test_timestamps_normalised_whether_quoted_or_not(project):
    recipe, folder, keys, _ = project
    doc = _signed(recipe, folder, keys)
    text = C.dump_contract(doc)
    unquoted = text.replace(f"'{doc.body.approved_at}'", doc.body.approved_at)
    assert unquoted != text
    assert C.parse_contract(unquoted).digest() == doc.digest()


# ----- drafting and scope ----------------------------------------------------------------------


def test_plan_scope_counts_gate_extensions_and_tokens(project, tmp_path):
    recipe, folder, _, _ = project
    scope = C.plan_scope(recipe, folder, 3600)
    assert scope.base_length == 256 and scope.stage_lengths == [512, 1024]
    assert scope.max_steps == 2 * (3 + 4)  # gate_policy "extend" may re-train each stage once
    assert scope.max_tokens == 2 * (3 * 512 * 2 + 4 * 1024 * 2)
    stop_recipe, stop_folder = load_recipe(make_project(tmp_path / "p2"))
    stop_recipe.context.gate_policy = "stop"
    assert C.plan_scope(stop_recipe, stop_folder, 3600).max_steps == 7


def test_model_identity_covers_config_weights_and_index(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    save_file({"a": np.zeros(2, np.float32)}, str(m / "model-00001-of-00002.safetensors"))
    save_file({"b": np.ones(2, np.float32)}, str(m / "model-00002-of-00002.safetensors"))
    (m / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    ident = C.model_identity(m, "m")
    assert [w.name for w in ident.weights] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    (m / "model.safetensors.index.json").write_text('{"weight_map": {"x": 1}}')
    assert C.model_identity(m, "m").sha256 != ident.sha256


def test_draft_summary_names_the_scope(project):
    recipe, folder, _, _ = project
    doc = C.draft_contract(recipe, folder, authorized_by=["alice"], run_id="run-9")
    summary = C.contract_summary(doc.body)
    assert "run-9" in summary and "256 -> 1024" in summary and "14 steps" in summary
    assert doc.body.signoff == C.SIGNOFF_SENTENCE and not doc.signatures


# ----- happy paths ----------------------------------------------------------------------------------


def test_single_approver_happy_path_grants_a_bound_approval(project, tmp_path):
    recipe, folder, keys, approvers = project
    path = tmp_path / "c.yaml"
    path.write_text(C.dump_contract(_signed(recipe, folder, keys)))
    run_dir = tmp_path / "runs" / "run-1"
    grant = G.authorize_run(recipe, folder, run_id="run-1", run_dir=run_dir, contract_path=path,
                            approvers_path=approvers, echo=lambda s: None)
    assert grant.approvers == ("alice",) and not grant.self_approved
    assert grant.contract_digest == grant.contract.digest() and grant.recipe_digest == recipe.digest()
    G.verify_grant(grant, recipe=recipe)
    assert not (run_dir / "contract" / "approval_token").exists()  # no bearer token any more (issue 14)
    for f in ("audit.jsonl", "contract.yaml"):
        assert (run_dir / "contract" / f).stat().st_mode & 0o777 == 0o600
    saved = C.load_contract(run_dir / "contract" / "contract.yaml")
    assert saved.digest() == grant.contract.digest() and len(saved.signatures) == 1
    events = [(r["event"], r["result"]) for r in G.read_audit(run_dir / "contract" / "audit.jsonl")]
    assert events == [("contract_verified", "pass"), ("grant_issued", "pass")]
    text = (run_dir / "contract" / "audit.jsonl").read_text()
    assert grant.contract.signatures[0].signature not in text  # digests only


def test_k_of_n_with_embedded_and_detached_signatures(project, tmp_path):
    recipe, folder, keys, approvers = project
    doc = _signed(recipe, folder, keys, names=(), k=2)
    path = tmp_path / "c.yaml"
    path.write_text(C.dump_contract(C.sign_contract(doc, C.load_private_key(keys["alice"].private), "alice")))
    bob_only = C.sign_contract(doc, C.load_private_key(keys["bob"].private), "bob")
    C.detached_path(path).write_text(C.dump_detached(bob_only))
    grant = G.authorize_run(recipe, folder, run_id="run-1", run_dir=tmp_path / "run-1", contract_path=path,
                            approvers_path=approvers)
    assert grant.approvers == ("alice", "bob")


def test_one_person_with_two_keys_counts_once(project, tmp_path):
    recipe, folder, keys, approvers = project
    second = C.generate_keypair("alice2", tmp_path / "keys")
    C.add_trusted_approver(approvers, "alice", second.public_key)  # alice's second key
    doc = _signed(recipe, folder, keys, names=("alice",), k=2)
    doc = C.sign_contract(doc, C.load_private_key(second.private), "alice")
    assert len(doc.signatures) == 2
    with pytest.raises(ContractError, match="from 1 approver"):
        C.verify_contract(doc, C.load_trust_policy(approvers))


def test_scope_checks_pass_within_the_approval_and_are_audited(project, tmp_path):
    recipe, folder, keys, approvers = project
    path = tmp_path / "c.yaml"
    path.write_text(C.dump_contract(_signed(recipe, folder, keys)))
    grant = G.authorize_run(recipe, folder, run_id="run-1", run_dir=tmp_path / "run-1", contract_path=path,
                            approvers_path=approvers)
    done = tokens = 0
    for length, steps in [(512, 3), (512, 3), (1024, 4), (1024, 4)]:  # both stages extended once
        G.check_scope(grant, stage_length=length, steps_so_far=done, stage_steps=steps, recipe=recipe,
                      data_sha256=grant.scope.data.sha256, tokens_so_far=tokens, stage_tokens=steps * 2 * length)
        done, tokens = done + steps, tokens + steps * 2 * length
    assert done == grant.scope.max_steps and tokens == grant.scope.max_tokens and grant.checks == 4
    G.close_run(grant, "completed")
    events = [r["event"] for r in G.read_audit(tmp_path / "run-1" / "contract" / "audit.jsonl")]
    assert events.count("scope_checked") == 4 and events[-1] == "run_closed"


def test_trust_file_discovery_order(project, tmp_path, home, monkeypatch):
    """The user's file is the trust root; a project file is never returned as it."""
    _, folder, _, approvers = project
    assert C.find_approvers_file(folder) is None
    user = home / "approvers.yaml"
    C.write_approvers_file(user, C.ApproversFile())
    assert C.find_approvers_file(folder) == user
    proj = folder / C.PROJECT_APPROVERS_FILE
    C.write_approvers_file(proj, C.ApproversFile())
    assert C.find_approvers_file(folder) == user  # the project file only restricts (resolve_trust_policy)
    assert C.project_approvers_file(folder) == proj
    monkeypatch.setenv(C.APPROVERS_ENV, str(approvers))
    assert C.find_approvers_file(folder) == approvers
    assert C.find_approvers_file(folder, tmp_path / "x.yaml") == tmp_path / "x.yaml"


def test_revocation_is_permanent(project):
    _, _, keys, approvers = project
    C.revoke_key(approvers, keys["bob"].key_id, "laptop stolen")
    policy = C.load_trust_policy(approvers)
    assert keys["bob"].key_id in policy.revoked and keys["bob"].key_id not in policy.approvers
    with pytest.raises(ContractError, match="revoked key cannot be trusted again"):
        C.add_trusted_approver(approvers, "bob", keys["bob"].public_key)


# ----- self-approval and the person at the keyboard ------------------------------------------------


def test_self_approve_flag_is_printed_recorded_and_uses_local_key(project, tmp_path, home):
    recipe, folder, _, _ = project
    said = []
    grant = G.authorize_run(recipe, folder, run_id="demo-1", run_dir=tmp_path / "demo-1", self_approve=True,
                            echo=said.append)
    assert any("SELF-APPROVAL" in s for s in said)
    assert grant.self_approved and grant.approvers == (C.local_approver_name(),)
    local = home / "keys" / "local.key"
    assert local.stat().st_mode & 0o777 == 0o600
    audit = G.read_audit(tmp_path / "demo-1" / "contract" / "audit.jsonl")
    self_rec = next(r for r in audit if r["event"] == "self_approval")
    assert self_rec["mode"] == "flag"
    assert next(r for r in audit if r["event"] == "contract_verified")["self_approved"] is True
    grant2 = G.authorize_run(recipe, folder, run_id="demo-2", run_dir=tmp_path / "demo-2", self_approve=True,
                             echo=said.append)
    assert grant2.contract.signatures[0].key_id == grant.contract.signatures[0].key_id  # same local key


def test_interactive_approval_with_typed_sentence(project, tmp_path):
    recipe, folder, _, _ = project
    answers = iter(["I accept", "I accept responsibility for this run."])
    said = []
    grant = G.authorize_run(recipe, folder, run_id="i-1", run_dir=tmp_path / "i-1", interactive=True,
                            ask=lambda prompt: next(answers), echo=said.append)
    assert grant.self_approved
    assert any("256 -> 1024" in s for s in said) and any("1 attempt" in s or "2 attempt" in s for s in said)
    mode = next(r for r in G.read_audit(tmp_path / "i-1" / "contract" / "audit.jsonl") if r["event"] == "self_approval")
    assert mode["mode"] == "interactive"


def test_signoff_prompt_gives_up_and_cancels():
    with pytest.raises(ContractError, match="not typed after 3 attempts"):
        G.ask_for_signoff("summary", ask=lambda p: "yes", echo=lambda s: None)

    def eof(prompt):
        raise EOFError

    with pytest.raises(ContractError, match="cancelled"):
        G.ask_for_signoff("summary", ask=eof, echo=lambda s: None)


def test_self_approval_refused_by_policy(project, tmp_path):
    recipe, folder, _, approvers = project
    doc = C.read_approvers_file(approvers)
    assert doc.allow_self_approval is None  # a user trust file that does not say: self-approval is off
    with pytest.raises(ContractError, match="Self-approval is not allowed"):
        G.authorize_run(recipe, folder, run_id="w", run_dir=tmp_path / "w", self_approve=True,
                        approvers_path=approvers, echo=lambda s: None)
    C.write_approvers_file(approvers, doc.model_copy(update={"allow_self_approval": False}))
    with pytest.raises(ContractError, match="Self-approval is not allowed"):
        G.authorize_run(recipe, folder, run_id="x", run_dir=tmp_path / "x", self_approve=True,
                        approvers_path=approvers, echo=lambda s: None)
    C.write_approvers_file(approvers, doc.model_copy(update={"allow_self_approval": True, "required_signatures": 2}))
    with pytest.raises(ContractError, match="requires 2 signatures"):
        G.authorize_run(recipe, folder, run_id="y", run_dir=tmp_path / "y", self_approve=True,
                        approvers_path=approvers, echo=lambda s: None)
    C.write_approvers_file(approvers, doc.model_copy(update={"allow_self_approval": True}))
    grant = G.authorize_run(recipe, folder, run_id="z", run_dir=tmp_path / "z", self_approve=True,
                            approvers_path=approvers, echo=lambda s: None)
    assert grant.self_approved


def test_planned_run_id(project, tmp_path):
    recipe, folder, keys, _ = project
    path = tmp_path / "c.yaml"
    path.write_text(C.dump_contract(_signed(recipe, folder, keys, run_id="from-contract")))
    assert G.planned_run_id(recipe, path) == "from-contract"
    path.write_text("contract_version: [")
    assert G.planned_run_id(recipe, path) is None  # recipe has no run_id; the gate records the failure
    assert G.planned_run_id(recipe, None) is None


def test_pure_modules_do_not_import_torch():
    code = ("import sys, scaler_wizard.safety.gatekeeper, scaler_wizard.safety.contract_cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_expiry_is_relative_to_the_clock_passed(project, tmp_path):
    recipe, folder, keys, approvers = project
    doc = _signed(recipe, folder, keys)
    later = C.parse_time(doc.body.expires_at) - timedelta(seconds=1)
    C.verify_contract(doc, C.load_trust_policy(approvers), now=later)
