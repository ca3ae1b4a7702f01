"""The tampering battery (issue 7): every case must be rejected with the right reason, be recorded
in the run's audit log, and take 0 training steps (or, mid-run, not one step beyond the approval).

Each case goes through ``run_if_authorized(authorize_run, body)``, where ``body`` is a stand-in for
the pipeline's stage loop: ``check_scope`` at each stage boundary, then the stage's steps. The
step counter is the proof that no training happens without a valid, in-scope approval.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from scaler_wizard.errors import ContractError
from scaler_wizard.recipe import load_recipe
from scaler_wizard.safety import contract as C
from scaler_wizard.safety import gatekeeper as G

RUN = "run-1"
APPROVED_STAGES = [(512, 3), (1024, 4)]  # the recipe below: schedule [512, 1024], steps [3, 4]


def make_project(root: Path) -> Path:
    model = root / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
    save_file({"w": np.arange(16, dtype=np.float32).reshape(4, 4)}, str(model / "model.safetensors"))
    (root / "train.jsonl").write_text('{"text": "In the beginning God created the heaven and the earth."}\n')
    recipe = {
        "run": {"name": "t", "output_dir": "runs"},
        "model": {"path": "model"},
        "data": {"train": ["train.jsonl"]},
        "context": {"target_length": 1024, "schedule": [512, 1024]},
        "training": {"steps_per_stage": [3, 4], "micro_batch_size": 2},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


@dataclass
class Env:
    tmp: Path
    recipe_path: Path
    keys: dict[str, C.KeyFiles]
    approvers: Path
    contract_path: Path
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.recipe_path.parent

    def recipe(self):
        return load_recipe(self.recipe_path)[0]

    def key(self, name):
        return C.load_private_key(self.keys[name].private)

    def draft(self, **kw):
        kw.setdefault("authorized_by", ["alice", "bob", "carol"])
        kw.setdefault("run_id", RUN)
        return C.draft_contract(self.recipe(), self.folder, **kw)

    def write(self, doc: C.Contract) -> Path:
        self.contract_path.write_text(C.dump_contract(doc))
        return self.contract_path

    def edit_text(self, old: str, new: str) -> None:
        text = self.contract_path.read_text()
        assert text.count(old) >= 1, old
        self.contract_path.write_text(text.replace(old, new, 1))


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv(C.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.delenv(C.APPROVERS_ENV, raising=False)
    recipe_path = make_project(tmp_path / "proj")
    keys = {n: C.generate_keypair(n, tmp_path / "keys") for n in ("alice", "bob", "carol", "mallory")}
    approvers = tmp_path / "approvers.yaml"
    for n in ("alice", "bob", "carol"):  # mallory is not trusted
        C.add_trusted_approver(approvers, n, keys[n].public_key)
    e = Env(tmp_path, recipe_path, keys, approvers, tmp_path / "contract.yaml")
    e.write(C.sign_contract(e.draft(), e.key("alice"), "alice"))
    return e


def attempt(env: Env, *, run_id: str = RUN, contract: Path | None | str = "default", now=None,
            stages=APPROVED_STAGES, on_grant: Callable[[G.ApprovalGrant], dict] | None = None,
            run_dir: Path | None = None, recipe=None) -> G.ApprovalGrant:
    """Authorize, then the stand-in stage loop: check_scope before each stage, then train its steps."""
    run_dir = run_dir or env.tmp / "runs" / uuid.uuid4().hex / run_id
    env.extra["run_dir"] = run_dir
    recipe = recipe or env.recipe()

    def authorize():
        return G.authorize_run(recipe, env.folder, run_id=run_id, run_dir=run_dir,
                               contract_path=env.contract_path if contract == "default" else contract,
                               approvers_path=env.approvers, now=now, echo=lambda s: None)

    def body(grant):
        scope_kwargs = on_grant(grant) if on_grant else {}
        for i, (length, steps) in enumerate(stages, start=1):
            G.check_scope(grant, stage_length=length, steps_so_far=env.steps, stage_steps=steps, stage_index=i,
                          **scope_kwargs)
            env.steps += steps  # the stage trains only after its check passed
        return grant

    return G.run_if_authorized(authorize, body)


def expect_rejection(env: Env, pattern: str, *, steps: int = 0, **kwargs) -> ContractError:
    with pytest.raises(ContractError, match=pattern) as info:
        attempt(env, **kwargs)
    assert info.value.exit_code == 3
    assert env.steps == steps, f"{env.steps} training steps taken in a rejected case"
    failures = [r for r in G.read_audit(G.audit_path(env.extra["run_dir"])) if r["result"] == "fail"]
    assert failures and failures[-1]["reason"] == str(info.value), "rejection not recorded in audit.jsonl"
    return info.value


def _flip_char(s: str, i: int) -> str:
    """A different character of the same kind (digit for digit), so the document still parses."""
    c = s[i]
    repl = str((int(c) + 1) % 10) if c.isdigit() else ("b" if c != "b" else "c")
    return s[:i] + repl + s[i + 1 :]


# --------------------------------------------------------------------------------------------------
# The cases: name -> (setup(env) -> kwargs for attempt, expected reason regex, steps allowed)
# --------------------------------------------------------------------------------------------------

TAMPERED = "changed after signing"
CASES: dict[str, tuple[Callable[[Env], dict], str, int]] = {}


def case(name: str, pattern: str, steps: int = 0):
    def register(fn):
        CASES[name] = (fn, pattern, steps)
        return fn

    return register


def _field_byte(env: Env, key: str, index: int = 0) -> None:
    """Change one byte of the value of the first line `key: value` of the contract file."""
    lines = env.contract_path.read_text().splitlines(keepends=True)
    for n, line in enumerate(lines):
        stripped = line.lstrip(" -")
        if stripped.startswith(key + ":"):
            start = line.index(key + ":") + len(key) + 2
            value_pos = start + index + (1 if line[start] == "'" else 0)
            lines[n] = _flip_char(line, value_pos)
            env.contract_path.write_text("".join(lines))
            return
    raise AssertionError(key)


for _key, _idx in [("session_id", 4), ("max_steps", 0), ("target_length", 0), ("recipe_digest", 7),
                   ("config_sha256", 3), ("expires_at", 3), ("signoff", 2), ("signed_at", 18), ("signature", 10),
                   ("contract_id", 0)]:
    case(f"one byte changed: {_key}", TAMPERED)(lambda env, k=_key, i=_idx: (_field_byte(env, k, i), {})[1])


@case("rollback plan changed after signing", TAMPERED)
def _(env):
    env.edit_text("to: last_passed_stage", "to: base_model")
    return {}


@case("one byte changed: weight file sha256 in the contract", TAMPERED)
def _(env):
    digest = C.plan_scope(env.recipe(), env.folder, 1).model.weights[0].sha256
    env.edit_text(digest, _flip_char(digest, 5))
    return {}


@case("one byte changed: an authorized_by name", TAMPERED)
def _(env):
    env.edit_text("- carol", "- carel")
    return {}


@case("one byte changed: the approver name in the signature block", TAMPERED)
def _(env):
    env.edit_text("- approver: alice", "- approver: alicf")
    return {}


@case("one byte changed: the key id in the signature block", "not a trusted approver key")
def _(env):
    kid = env.keys["alice"].key_id
    env.edit_text(kid, _flip_char(kid, 0))
    return {}


@case("signature from an untrusted key", "not a trusted approver key")
def _(env):
    env.write(C.sign_contract(env.draft(authorized_by=["alice", "mallory"]), env.key("mallory"), "mallory"))
    return {}


@case("untrusted key claiming to be a trusted approver", "not a trusted approver key")
def _(env):
    env.write(C.sign_contract(env.draft(), env.key("mallory"), "alice"))
    return {}


@case("trusted key id with a signature made by another key", "does not match the contract")
def _(env):
    doc = C.sign_contract(env.draft(), env.key("mallory"), "alice")
    sig = doc.signatures[0].model_copy(update={"key_id": env.keys["alice"].key_id})
    env.write(doc.model_copy(update={"signatures": (sig,)}))
    return {}


@case("signature from a revoked key", "revoked")
def _(env):
    C.revoke_key(env.approvers, env.keys["alice"].key_id, "key leaked")
    return {}


@case("trusted approver the contract does not name", "does not name")
def _(env):
    env.write(C.sign_contract(env.draft(authorized_by=["alice", "bob"]), env.key("carol"), "carol"))
    return {}


@case("unsigned contract", "no signatures")
def _(env):
    env.write(env.draft())
    return {}


@case("expired contract", "expired at")
def _(env):
    doc = C.load_contract(env.contract_path)
    return {"now": C.parse_time(doc.body.expires_at) + timedelta(seconds=1)}


@case("not-yet-valid contract", "not valid yet")
def _(env):
    env.write(C.sign_contract(env.draft(not_before=C.utc_now() + timedelta(days=2)), env.key("alice"), "alice"))
    return {}


@case("wrong signoff text (properly signed)", "signoff reads")
def _(env):
    env.write(C.sign_contract(env.draft(signoff="I have read this"), env.key("alice"), "alice"))
    return {}


@case("unsupported contract version", "contract_version 3")
def _(env):
    env.edit_text("contract_version: 2", "contract_version: 3")
    return {}


@case("unknown field added", "does not match contract version")
def _(env):
    env.contract_path.write_text(env.contract_path.read_text() + "max_steps_override: 1000\n")
    return {}


@case("k-of-n with too few signatures", "needs 2")
def _(env):
    env.write(C.sign_contract(env.draft(required_signatures=2), env.key("alice"), "alice"))
    return {}


@case("trust policy asks more signatures than the contract", r"needs 2 .*trust policy")
def _(env):
    doc = C.read_approvers_file(env.approvers)
    C.write_approvers_file(env.approvers, doc.model_copy(update={"required_signatures": 2}))
    return {}


@case("detached signature made for another contract", "was made for contract")
def _(env):
    other = C.sign_contract(env.draft(run_id="run-other"), env.key("bob"), "bob")
    env.write(env.draft())
    C.detached_path(env.contract_path).write_text(C.dump_detached(other))
    return {}


@case("recipe changed after signing", "recipe changed after the contract was signed")
def _(env):
    data = yaml.safe_load(env.recipe_path.read_text())
    data["training"]["learning_rate"] = 0.5
    env.recipe_path.write_text(yaml.safe_dump(data))
    return {}


@case("data file changed after signing", "data file train.jsonl changed")
def _(env):
    with open(env.folder / "train.jsonl", "a") as fh:
        fh.write('{"text": "and a poisoned line"}\n')
    return {}


@case("model weights changed after signing (same size)", "model weight file model.safetensors changed")
def _(env):
    path = env.folder / "model" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    return {}


@case("model config changed after signing", "config.json changed")
def _(env):
    (env.folder / "model" / "config.json").write_text(json.dumps({"model_type": "llama",
                                                                   "max_position_embeddings": 256, "x": 1}))
    return {}


@case("contract for another run", "authorises run 'run-1', not this run 'run-2'")
def _(env):
    return {"run_id": "run-2"}


@case("contract reused for a run folder already authorised", "already authorised")
def _(env):
    run_dir = env.tmp / "runs" / "reused" / RUN
    grant = attempt(env, run_dir=run_dir)
    G.close_run(grant, "completed")
    env.steps = 0
    return {"run_dir": run_dir}


@case("malformed YAML", "not valid YAML")
def _(env):
    env.contract_path.write_text(env.contract_path.read_text()[:-40] + "\n  - [unclosed\n")
    return {}


@case("oversized document", "over the 65536-byte limit")
def _(env):
    env.contract_path.write_text(env.contract_path.read_text() + "#" + "x" * 70_000 + "\n")
    return {}


@case("YAML alias bomb", "anchors|aliases")
def _(env):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n"
    env.contract_path.write_text("contract_version: 1\n" + bomb)
    return {}


@case("duplicate key (two readers could disagree)", "duplicate key")
def _(env):
    env.contract_path.write_text(env.contract_path.read_text() + "session_id: run-2\n")
    return {}


@case("not UTF-8", "not UTF-8")
def _(env):
    env.contract_path.write_bytes(env.contract_path.read_bytes().replace(b"alice", b"al\xffce", 1))
    return {}


@case("no contract and nobody at a terminal", "No contract for this run")
def _(env):
    return {"contract": None}


# ---- the grant (no bearer token since issue 14: the verified contract is re-checked) ----


def _other_runs_contract(env: Env) -> Callable[[G.ApprovalGrant], dict]:
    other = C.sign_contract(env.draft(run_id="run-other"), env.key("alice"), "alice")

    def swap(grant: G.ApprovalGrant) -> dict:
        grant.contract = other
        return {}

    return swap


@case("grant holding another run's contract", "changed")
def _(env):
    return {"on_grant": _other_runs_contract(env)}


@case("grant replayed after the run ended", "closed|ended at")
def _(env):
    return {"on_grant": lambda g: (G.close_run(g, "completed"), {})[1]}


def _raise_max_steps(grant: G.ApprovalGrant) -> dict:
    grant.scope = grant.scope.model_copy(update={"max_steps": 10**6})
    return {}


@case("grant whose scope was raised in memory", "changed")
def _(env):
    return {"on_grant": _raise_max_steps}


def _mallory_contract(env: Env) -> Callable[[G.ApprovalGrant], dict]:
    def swap(grant: G.ApprovalGrant) -> dict:
        doc = C.sign_contract(env.draft(authorized_by=["alice", "mallory"]), env.key("mallory"), "mallory")
        grant.contract, grant.contract_digest = doc, doc.digest()
        grant.scope = doc.body.scope
        return {}

    return swap


@case("grant re-pointed to a contract signed by an untrusted key", "not a trusted approver key")
def _(env):
    return {"on_grant": _mallory_contract(env)}


@case("approver key revoked while the run is going", "revoked")
def _(env):
    return {"on_grant": lambda g: (C.revoke_key(env.approvers, env.keys["alice"].key_id, "leaked mid-run"), {})[1]}


@case("approved wall time used up", "expired at .* wall time")
def _(env):
    return {"on_grant": lambda g: {"now": g.expires_at + timedelta(seconds=1)}}


@case("recipe changed mid-run", "recipe changed during the run")
def _(env):
    changed = env.recipe().model_copy(deep=True)
    changed.training.learning_rate = 0.5
    return {"on_grant": lambda g: {"recipe": changed}}


@case("data changed mid-run", "training data now hashes")
def _(env):
    return {"on_grant": lambda g: {"data_sha256": "0" * 64}}


# ---- scope exceeded mid-run: the stage that would exceed never trains ----


@case("target context raised mid-run", "beyond the approved target context of 1024", steps=3)
def _(env):
    return {"stages": [(512, 3), (2048, 4)]}


@case("stage length outside the approved schedule", "not one of the approved stages", steps=3)
def _(env):
    return {"stages": [(512, 3), (768, 4)]}


@case("steps raised mid-run", "over the approved 14 steps", steps=14)
def _(env):
    return {"stages": [(512, 3), (512, 3), (1024, 4), (1024, 4), (1024, 1)]}


@case("training tokens raised mid-run", "training tokens would pass")
def _(env):
    return {"stages": [(512, 3), (1024, 4)],
            "on_grant": lambda g: {"tokens_so_far": g.scope.max_tokens, "stage_tokens": 1}}


@pytest.mark.parametrize("name", list(CASES))
def test_battery_case_is_rejected_with_the_right_reason(env, name):
    setup, pattern, steps = CASES[name]
    kwargs = setup(env)
    expect_rejection(env, pattern, steps=steps, **kwargs)


def test_battery_has_at_least_25_cases():
    assert len(CASES) >= 25


def test_untampered_contract_passes_the_same_harness(env):
    grant = attempt(env)
    assert env.steps == sum(s for _, s in APPROVED_STAGES) and grant.checks == len(APPROVED_STAGES)


def test_every_byte_of_the_signed_document_is_covered(env):
    """Change each byte of the contract file in turn: every change that alters the parsed document
    is rejected; the only accepted changes are ones that leave the parsed content identical (a
    comment). Verification only (signatures, trust, time) -- the binding checks are covered above."""
    original = env.contract_path.read_bytes()
    trust = C.load_trust_policy(env.approvers)
    reference = C.parse_contract(original)
    rejected = accepted_noop = 0
    for i in range(len(original)):
        mutated = bytearray(original)
        mutated[i] = ord("b") if mutated[i] != ord("b") else ord("c")
        try:
            doc = C.parse_contract(bytes(mutated), f"byte {i}")
            C.verify_contract(doc, trust)
        except ContractError:
            rejected += 1
            continue
        assert doc == reference, f"byte {i} changed the content and was accepted"
        accepted_noop += 1
    header = original.index(b"contract_version")
    assert accepted_noop <= header  # only the comment header can change without effect
    assert rejected >= len(original) - header
