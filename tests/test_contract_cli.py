"""`scaler-wizard contract ...` through typer's CliRunner, and the interactive approval driven
through a real pseudo-terminal (the person types the signoff sentence)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file
from typer.testing import CliRunner

from scaler_wizard.errors import ContractError
from scaler_wizard.recipe import load_recipe
from scaler_wizard.safety import contract as C
from scaler_wizard.safety import gatekeeper as G
from scaler_wizard.safety.contract_cli import contract_app

runner = CliRunner()


def make_project(root: Path) -> Path:
    model = root / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
    save_file({"w": np.arange(16, dtype=np.float32).reshape(4, 4)}, str(model / "model.safetensors"))
    (root / "train.jsonl").write_text('{"text": "In the beginning God created the heaven and the earth."}\n')
    recipe = {
        "run": {"name": "t", "output_dir": "runs", "run_id": "cli-run"},
        "model": {"path": "model"},
        "data": {"train": ["train.jsonl"]},
        "context": {"target_length": 1024, "schedule": [512, 1024]},
        "training": {"steps_per_stage": [3, 4], "micro_batch_size": 2},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(C.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.delenv(C.APPROVERS_ENV, raising=False)
    monkeypatch.delenv(C.PASSPHRASE_ENV, raising=False)
    return tmp_path / "home"


def invoke(*args: str, ok: bool = True):
    result = runner.invoke(contract_app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_keygen_draft_sign_verify_two_of_three(tmp_path, home):
    recipe = make_project(tmp_path / "proj")
    for name in ("alice", "bob", "carol"):
        out = invoke("keygen", "--name", name, "--trust").output
        assert "mode 0600" in out and f"{name} added to" in out
    approvers = home / "approvers.yaml"
    assert {a.name for a in C.load_trust_policy(approvers).approvers.values()} == {"alice", "bob", "carol"}

    contract = tmp_path / "run.contract.yaml"
    out = invoke("draft", recipe, "--out", contract, "--approver", "alice", "--approver", "bob",
                 "--approver", "carol", "--required", "2", "--max-wall-hours", "2").output
    assert "cli-run" in out and "2.00 h" in out
    keys = home / "keys"
    invoke("sign", contract, "--key", keys / "alice.key")
    failed = invoke("verify", contract, ok=False)
    assert isinstance(failed.exception, ContractError) and failed.exception.exit_code == 3
    assert "needs 2" in str(failed.exception)

    out = invoke("sign", contract, "--key", keys / "bob.key", "--detached").output
    assert C.detached_path(contract).is_file() and "bob" in out
    out = invoke("verify", contract, "--recipe", recipe).output
    assert "signed by alice, bob (2 of 2 required)" in out and "recipe, model and data match" in out

    # the contract the CLI wrote is the one the gate accepts
    parsed, folder = load_recipe(recipe)
    grant = G.authorize_run(parsed, folder, run_id="cli-run", run_dir=tmp_path / "runs" / "cli-run",
                            contract_path=contract)
    assert grant.approvers == ("alice", "bob")


def test_verify_reports_a_tampered_contract(tmp_path, home):
    recipe = make_project(tmp_path / "proj")
    invoke("keygen", "--name", "alice", "--trust")
    contract = tmp_path / "c.yaml"
    invoke("draft", recipe, "--out", contract, "--approver", "alice")
    invoke("sign", contract, "--key", home / "keys" / "alice.key")
    contract.write_text(contract.read_text().replace("max_steps: 14", "max_steps: 94"))
    result = invoke("verify", contract, ok=False)
    assert isinstance(result.exception, ContractError) and "changed after signing" in str(result.exception)


def test_draft_refuses_to_overwrite(tmp_path, home):
    recipe = make_project(tmp_path / "proj")
    invoke("draft", recipe)
    default = recipe.with_name("recipe.contract.yaml")
    assert default.is_file()
    result = invoke("draft", recipe, ok=False)
    assert "not overwritten" in str(result.exception)


def test_encrypted_key_signs_with_passphrase_from_env(tmp_path, home, monkeypatch):
    recipe = make_project(tmp_path / "proj")
    monkeypatch.setenv(C.PASSPHRASE_ENV, "s3cret pass")
    out = invoke("keygen", "--name", "dora", "--passphrase", "--trust").output
    assert "encrypted" in out
    contract = tmp_path / "c.yaml"
    invoke("draft", recipe, "--out", contract, "--approver", "dora")
    invoke("sign", contract, "--key", home / "keys" / "dora.key")
    assert "signed by dora" in invoke("verify", contract).output


def test_trust_and_revoke_commands(tmp_path, home):
    recipe = make_project(tmp_path / "proj")
    invoke("keygen", "--name", "erin", "--out", tmp_path / "k")
    approvers = tmp_path / "team.yaml"
    out = invoke("trust", "erin", tmp_path / "k" / "erin.pub", "--approvers", approvers).output
    kid = C.load_trust_policy(approvers).approvers.popitem()[0]
    assert kid in out
    contract = tmp_path / "c.yaml"
    invoke("draft", recipe, "--out", contract, "--approver", "erin")
    invoke("sign", contract, "--key", tmp_path / "k" / "erin.key")
    invoke("verify", contract, "--approvers", approvers)
    invoke("revoke", kid, "--reason", "left the team", "--approvers", approvers)
    result = invoke("verify", contract, "--approvers", approvers, ok=False)
    assert "revoked" in str(result.exception) and "left the team" in str(result.exception)


def test_audit_prints_who_approved_what_and_the_failures(tmp_path, home):
    recipe_path = make_project(tmp_path / "proj")
    recipe, folder = load_recipe(recipe_path)
    run_dir = tmp_path / "runs" / "cli-run"
    grant = G.authorize_run(recipe, folder, run_id="cli-run", run_dir=run_dir, self_approve=True, echo=lambda s: None)
    G.check_scope(grant, stage_length=512, steps_so_far=0, stage_steps=3, stage_index=1)
    with pytest.raises(ContractError):
        G.check_scope(grant, stage_length=2048, steps_so_far=3, stage_steps=4, stage_index=2)
    G.close_run(grant, "halted")
    out = invoke("audit", run_dir).output
    for text in ("contract_verified", "SELF-APPROVED", "self_approval", "grant_issued", "scope_checked",
                 "scope_rejected", "beyond the approved target context", "run_closed", C.local_approver_name(),
                 "256 -> 1024"):
        assert text in out, text
    missing = invoke("audit", tmp_path / "nothing", ok=False)
    assert "never reached the contract gate" in str(missing.exception)


# ----- the person at the keyboard, through a pseudo-terminal -------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from scaler_wizard.errors import ContractError
    from scaler_wizard.recipe import load_recipe
    from scaler_wizard.safety.gatekeeper import authorize_run

    recipe, folder = load_recipe(sys.argv[1])
    try:
        grant = authorize_run(recipe, folder, run_id="cli-run", run_dir=Path(sys.argv[2]),
                              interactive=sys.stdin.isatty())
    except ContractError as exc:
        print("REJECTED:", exc, flush=True)
        sys.exit(exc.exit_code)
    print("GRANTED", ",".join(grant.approvers), flush=True)
    """
)


def _drive_pty(tmp_path: Path, answers: list[bytes]) -> tuple[int, str, Path]:
    """Run the gate in a child whose stdin/stdout are a pseudo-terminal; type each answer when the
    prompt appears. Returns (exit code, everything the terminal showed, run dir)."""
    recipe = make_project(tmp_path / "proj")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run_dir = tmp_path / "runs" / "cli-run"
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, str(script), str(recipe), str(run_dir)], stdin=slave, stdout=slave,
                            stderr=slave, env=dict(os.environ), close_fds=True)
    os.close(slave)
    seen, typed, deadline = b"", 0, time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            if typed < len(answers) and seen.count(b"to approve") > typed:
                os.write(master, answers[typed])
                typed += 1
            if proc.poll() is not None and not ready:
                break
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return rc, seen.decode(errors="replace"), run_dir


def test_interactive_approval_through_a_pty(tmp_path, home):
    rc, screen, run_dir = _drive_pty(tmp_path, [b"I accept responsibility\n", b"I accept responsibility for this run\n"])
    assert rc == 0, screen
    assert "256 -> 1024" in screen and "2 attempt(s) left" in screen
    assert "not the sentence" in screen and f"GRANTED {C.local_approver_name()}" in screen
    audit = G.read_audit(G.audit_path(run_dir))
    assert [r["event"] for r in audit] == ["self_approval", "contract_verified", "grant_issued"]
    assert audit[0]["mode"] == "interactive"
    assert (home / "keys" / "local.key").stat().st_mode & 0o777 == 0o600


def test_interactive_refusal_through_a_pty_exits_3(tmp_path, home):
    rc, screen, run_dir = _drive_pty(tmp_path, [b"yes\n", b"ok\n", b"sure\n"])
    assert rc == 3, screen
    assert "REJECTED" in screen and "not typed after 3 attempts" in screen
    audit = G.read_audit(G.audit_path(run_dir))
    assert audit[-1]["event"] == "contract_rejected" and "3 attempts" in audit[-1]["reason"]
    assert not (run_dir / "contract" / "approval_token").exists()
