"""Issue 14 APIs, unit level: read_verified / materialize under races (a thread swaps the file at
the moment that matters), the bound file set, the replay ledger (concurrent consumers), the work
budget, the one trust resolution, safe document reading, run-id validation."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


def make_project(root: Path, **extra) -> Path:
    model = root / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
    save_file({"w": np.arange(4096, dtype=np.float32)}, str(model / "model.safetensors"))
    (model / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (model / "chat_template.jinja").write_text("{{ messages }}")
    (model / "pytorch_model.bin").write_bytes(b"pickle, never loaded")
    (model / ".cache").mkdir()
    (model / ".cache" / "x").write_text("ignored")
    (root / "train.jsonl").write_text('{"text": "In the beginning God created the heaven and the earth."}\n')
    (root / "probes").mkdir()
    (root / "probes" / "p.py").write_text("X = 1\n")
    (root / "probes" / "__pycache__").mkdir()
    (root / "probes" / "__pycache__" / "p.cpython-311.pyc").write_bytes(b"\0" * 16)
    recipe = {
        "run": {"name": "t", "output_dir": "runs"},
        "model": {"path": "model"},
        "data": {"train": ["train.jsonl"]},
        "context": {"target_length": 1024, "schedule": [512, 1024]},
        "training": {"steps_per_stage": [3, 4], "micro_batch_size": 2},
        "evaluation": {"probe_dirs": ["probes"]},
        **extra,
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(C.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.delenv(C.APPROVERS_ENV, raising=False)
    return tmp_path / "home"


@pytest.fixture
def proj(tmp_path, home):
    recipe, folder = load_recipe(make_project(tmp_path / "proj"))
    scope = C.plan_scope(recipe, folder, 3600)
    return recipe, folder, scope


# ----- the bound file set -------------------------------------------------------------------


def test_scope_binds_every_loadable_file_and_only_those(proj):
    _, _, scope = proj
    bound = {(f.role, f.root, f.rel) for f in scope.files}
    assert ("model", "model", "tokenizer.json") in bound and ("model", "model", "chat_template.jinja") in bound
    assert ("model", "model", "config.json") in bound and ("model", "model", "model.safetensors") in bound
    assert ("data", "train.jsonl", "") in bound and ("probe_code", "probes", "p.py") in bound
    assert not any(r.endswith(".bin") or ".cache" in r or "__pycache__" in r for _, _, r in bound)


def test_teacher_and_offline_cache_are_bound(tmp_path, home):
    root = tmp_path / "p2"
    path = make_project(root, distillation={"enabled": True, "teacher": "model", "teacher_path": "model"})
    recipe, folder = load_recipe(path)
    roles = {f.role for f in C.plan_scope(recipe, folder, 60).files}
    assert "teacher" in roles
    (root / "cache").mkdir()
    (root / "cache" / "a.safetensors").write_bytes(b"x")
    data = yaml.safe_load(path.read_text())
    data["distillation"] = {"enabled": True, "teacher": "offline", "cache": "cache"}
    path.write_text(yaml.safe_dump(data))
    recipe, folder = load_recipe(path)
    assert "distill_cache" in {f.role for f in C.plan_scope(recipe, folder, 60).files}


def test_fifo_or_symlink_inside_a_bound_folder_is_refused(proj):
    recipe, folder, _ = proj
    os.mkfifo(folder / "model" / "tokenizer_config.json")
    with pytest.raises(ContractError, match="not a regular file"):
        C.plan_scope(recipe, folder, 60)
    os.unlink(folder / "model" / "tokenizer_config.json")
    os.symlink(folder / "train.jsonl", folder / "model" / "special_tokens_map.json")
    with pytest.raises(ContractError, match="symbolic link"):
        C.plan_scope(recipe, folder, 60)


# ----- read_verified / materialize, and the races -------------------------------------------


def test_read_verified_returns_the_approved_bytes(proj):
    _, folder, scope = proj
    v = C.VerifiedScope.of(scope, folder)
    data = v.read_verified(folder / "model" / "tokenizer.json")
    assert data == (folder / "model" / "tokenizer.json").read_bytes()
    assert C.read_verified(scope, folder / "train.jsonl", folder) == (folder / "train.jsonl").read_bytes()
    with pytest.raises(ContractError, match="not part of the approved scope"):
        v.read_verified(folder / "recipe.yaml")


@pytest.mark.parametrize("kind", ["changed", "symlink", "fifo", "directory"])
def test_read_verified_refuses_anything_but_the_approved_regular_file(proj, kind):
    _, folder, scope = proj
    target = folder / "model" / "tokenizer.json"
    target.unlink()
    if kind == "changed":
        target.write_text("{}")
    elif kind == "symlink":
        os.symlink(folder / "train.jsonl", target)
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    pattern = {"changed": "changed after the contract", "symlink": "symbolic link", "fifo": "FIFO",
               "directory": "directory"}[kind]
    t = time.monotonic()
    with pytest.raises(ContractError, match=pattern):
        C.VerifiedScope.of(scope, folder).read_verified(target)
    assert time.monotonic() - t < 5  # a FIFO never blocks


def _race(swap, stop_after: float = 1.0):
    """Run ``swap(i)`` in a thread, as fast as it goes, until stopped."""
    stop = threading.Event()

    def loop():
        i = 0
        while not stop.is_set():
            swap(i)
            i += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return stop, t


def test_race_read_verified_never_returns_swapped_bytes(proj):
    """A thread replaces the file (atomic rename) with other bytes and back, continuously: every
    read_verified either returns exactly the approved bytes or refuses."""
    _, folder, scope = proj
    target = folder / "model" / "model.safetensors"
    good = target.read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 1
    tmp_good, tmp_bad = folder / "g.tmp", folder / "b.tmp"

    def swap(i):
        src = tmp_bad if i % 2 == 0 else tmp_good
        src.write_bytes(bytes(bad) if i % 2 == 0 else good)
        os.replace(src, target)

    v = C.VerifiedScope.of(scope, folder)
    stop, t = _race(swap)
    ok = refused = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                data = v.read_verified(target)
            except ContractError:
                refused += 1
                continue
            assert data == good
            ok += 1
    finally:
        stop.set()
        t.join()
    assert ok + refused > 20 and refused > 0


def test_race_symlink_swap_is_always_refused(proj):
    """A thread flips the file between the real file and a symlink to other bytes: a symlink is
    never followed, so the reader gets the approved bytes or a refusal."""
    _, folder, scope = proj
    target = folder / "model" / "tokenizer.json"
    good = target.read_bytes()
    evil = folder / "evil.json"
    evil.write_bytes(good)  # same bytes: even then a link is refused
    tmp_link, tmp_file = folder / "l.tmp", folder / "f.tmp"

    def swap(i):
        if i % 2 == 0:
            os.symlink(evil, tmp_link)
            os.replace(tmp_link, target)
        else:
            tmp_file.write_bytes(good)
            os.replace(tmp_file, target)

    v = C.VerifiedScope.of(scope, folder)
    stop, t = _race(swap)
    results = []
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                results.append(v.read_verified(target) == good)
            except ContractError as exc:
                results.append("symbolic link" in str(exc) or "does not exist" in str(exc))
    finally:
        stop.set()
        t.join()
    assert results and all(results)


def test_race_materialize_copies_only_approved_bytes(proj, tmp_path):
    """While a thread swaps a weight file, materialize either produces a private copy whose bytes
    all verify, or refuses and leaves no copy behind."""
    _, folder, scope = proj
    target = folder / "model" / "model.safetensors"
    good = target.read_bytes()
    bad = good[:-1] + bytes([good[-1] ^ 1])

    def swap(i):
        tmp = folder / "s.tmp"
        tmp.write_bytes(bad if i % 2 == 0 else good)
        os.replace(tmp, target)

    v = C.VerifiedScope.of(scope, folder)
    stop, t = _race(swap)
    made = refused = 0
    try:
        for i in range(30):
            dest = tmp_path / f"copy-{i}"
            try:
                out = v.materialize("model", "model", dest)
            except ContractError:
                refused += 1
                assert not dest.exists()
                continue
            made += 1
            assert (out / "model.safetensors").read_bytes() == good
            assert stat.S_IMODE(out.stat().st_mode) == 0o700
            assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o600
            assert not (out / "pytorch_model.bin").exists()
    finally:
        stop.set()
        t.join()
    assert made + refused == 30


def test_check_all_rehashes_every_bound_file(proj):
    _, folder, scope = proj
    v = C.VerifiedScope.of(scope, folder)
    v.check_all()
    (folder / "probes" / "p.py").write_text("X = 2\n")
    with pytest.raises(ContractError, match="probe_code probes/p.py changed"):
        v.check_all()


def test_data_sha256_of_the_verified_scope_matches_the_data_identity(proj):
    _, folder, scope = proj
    assert C.VerifiedScope.of(scope, folder).data_sha256 == scope.data.sha256


# ----- replay ledger ------------------------------------------------------------------------


def test_ledger_one_run_per_contract_even_when_started_at_once(tmp_path):
    ledger = G.ReplayLedger(tmp_path / "state")

    def attempt(i):
        try:
            ledger.consume("cid", "d" * 64, "run-1", run_dir=tmp_path / f"r{i}" / "run-1")
            return True
        except ContractError:
            return False

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(16)))
    assert results.count(True) == 1
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.folder.stat().st_mode) == 0o700


def test_ledger_allows_only_the_resume_of_the_same_run(tmp_path):
    ledger = G.ReplayLedger(tmp_path / "state")
    run_dir = tmp_path / "runs" / "run-1"
    ledger.consume("cid", "d" * 64, "run-1", run_dir=run_dir)
    ledger.consume("cid", "d" * 64, "run-1", run_dir=run_dir, resuming=True)
    with pytest.raises(ContractError, match="already used"):
        ledger.consume("cid", "d" * 64, "run-1", run_dir=tmp_path / "other" / "run-1", resuming=True)
    with pytest.raises(ContractError, match="already used"):
        ledger.consume("other-id", "d" * 64, "run-2", run_dir=tmp_path / "runs" / "run-2")  # same digest


def test_ledger_lives_in_the_user_state_folder(home):
    assert G.ReplayLedger().path == home / "state" / G.LEDGER_NAME


# ----- work budget --------------------------------------------------------------------------


def test_work_budget_counts_work_not_positions():
    budget = G.WorkBudget(max_steps=5, max_tokens=500)
    for _ in range(3):
        budget.charge(1, 100)
    # a rollback puts the position back to 0: the budget does not give the steps back
    budget.charge(1, 100)
    budget.charge(1, 100)
    with pytest.raises(ContractError, match="5 optimizer steps done"):
        budget.charge(1, 0)
    assert budget.steps == 5 and budget.steps_left == 0
    resumed = G.WorkBudget(5, 500)
    resumed.restore(budget.to_dict())
    resumed.restore({"steps": 1})  # never lowered
    assert resumed.steps == 5
    with pytest.raises(ContractError, match="training tokens"):
        G.WorkBudget(10, 100).charge(1, 101)


def test_check_scope_counts_the_budget_and_can_require_counts(proj, tmp_path):
    recipe, folder, _ = proj
    path = tmp_path / "c.yaml"
    C.add_trusted_approver(tmp_path / "approvers.yaml", "alice", C.generate_keypair("alice", tmp_path / "k").public_key)
    doc = C.draft_contract(recipe, folder, authorized_by=["alice"], run_id="run-1")
    path.write_text(C.dump_contract(C.sign_contract(doc, C.load_private_key(tmp_path / "k" / "alice.key"), "alice")))
    grant = G.authorize_run(recipe, folder, run_id="run-1", run_dir=tmp_path / "runs" / "run-1", contract_path=path,
                            approvers_path=tmp_path / "approvers.yaml", echo=lambda s: None)
    grant.work.steps = grant.scope.max_steps - 2  # done by earlier attempts, whatever the position says
    with pytest.raises(ContractError, match="over the approved"):
        G.check_scope(grant, stage_length=512, steps_so_far=0, stage_steps=3)
    with pytest.raises(ContractError, match="needs the stage's token count"):
        G.check_scope(grant, stage_length=512, steps_so_far=0, stage_steps=1, require_counts=True)
    G.check_scope(grant, stage_length=512, steps_so_far=0, stage_steps=1, stage_tokens=1024,
                  data_sha256=grant.verified.data_sha256, require_counts=True, recheck_files=True)
    (folder / "model" / "chat_template.jsonl").write_text("added")  # not bound: re-hash ignores it
    (folder / "model" / "chat_template.jinja").write_text("changed")
    with pytest.raises(ContractError, match="chat_template.jinja changed"):
        G.check_scope(grant, stage_length=512, steps_so_far=0, stage_steps=1, recheck_files=True)


# ----- trust resolution ---------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path):
    return {n: C.generate_keypair(n, tmp_path / "keys") for n in ("alice", "bob", "mallory")}


def _write(path: Path, **doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def _entry(keys, n):
    return {"name": n, "public_key": keys[n].public_key}


def test_user_file_is_authoritative_and_project_only_restricts(tmp_path, home, keys):
    _write(home / "approvers.yaml", approvers=[_entry(keys, "alice"), _entry(keys, "bob")],
           allow_self_approval=True, max_validity_days=30)
    proj = tmp_path / "proj"
    _write(proj / C.PROJECT_APPROVERS_FILE, approvers=[_entry(keys, "alice"), _entry(keys, "mallory")],
           required_signatures=2, allow_self_approval=False, max_validity_days=7,
           revoked=[{"key_id": keys["bob"].key_id}])
    policy = C.resolve_trust_policy(proj)
    assert {a.name for a in policy.approvers.values()} == {"alice"}  # mallory ignored, bob revoked + not listed
    assert policy.required_signatures == 2 and policy.allow_self_approval is False
    assert policy.max_validity_days == 7 and keys["bob"].key_id in policy.revoked
    assert any("mallory" in n for n in policy.notes)
    assert "(user)" in policy.describe_source() and "(project: restrictions only)" in policy.describe_source()


def test_project_file_never_adds_trust_unrevokes_or_allows(tmp_path, home, keys):
    _write(home / "approvers.yaml", approvers=[_entry(keys, "alice")], revoked=[{"key_id": keys["bob"].key_id}],
           max_validity_days=10)
    proj = tmp_path / "proj"
    _write(proj / C.PROJECT_APPROVERS_FILE, approvers=[_entry(keys, "bob"), _entry(keys, "mallory")], revoked=[],
           allow_self_approval=True, max_validity_days=3650, required_signatures=1)
    policy = C.resolve_trust_policy(proj)
    assert policy.approvers == {}  # the project listed only keys the user does not trust
    assert keys["bob"].key_id in policy.revoked and policy.allow_self_approval is False
    assert policy.max_validity_days == 10 and len(policy.notes) >= 3


def test_project_file_without_a_user_file_grants_nothing(tmp_path, home, keys):
    proj = tmp_path / "proj"
    _write(proj / C.PROJECT_APPROVERS_FILE, approvers=[_entry(keys, "mallory")], allow_self_approval=True)
    policy = C.resolve_trust_policy(proj)
    assert policy.approvers == {} and policy.allow_self_approval is None  # explicit self-approval only
    _write(proj / C.PROJECT_APPROVERS_FILE, allow_self_approval=False)
    assert C.resolve_trust_policy(proj).allow_self_approval is False


def test_symlinked_project_trust_file_is_refused(tmp_path, home, keys):
    proj = tmp_path / "proj"
    target = _write(tmp_path / "elsewhere.yaml", approvers=[])
    (proj / ".scaler-wizard").mkdir(parents=True)
    os.symlink(target, proj / C.PROJECT_APPROVERS_FILE)
    with pytest.raises(ContractError, match="symbolic link"):
        C.resolve_trust_policy(proj)


# ----- documents, validity, run ids ---------------------------------------------------------


@pytest.mark.parametrize("text, pattern", [
    ("a: &x 1\nb: 2\n", "anchors"),
    ("a: 1\n<<: {b: 2}\n", "merge keys"),
    ("a: {<<: [{b: 1}], c: 2}\n", "merge keys"),
    ("a: !!python/object:os.system x\n", "could not determine|not valid YAML"),
])
def test_safe_yaml_refuses_anchors_merge_keys_and_tags(text, pattern):
    with pytest.raises(ContractError, match=pattern):
        C.safe_yaml(text, "<t>")


def test_draft_refuses_validity_beyond_the_maximum(proj):
    recipe, folder, _ = proj
    for days in (91, 3_000_000):
        with pytest.raises(ContractError, match="maximum"):
            C.draft_contract(recipe, folder, authorized_by=["alice"], valid_for=timedelta(days=days))
    with pytest.raises(ContractError, match="maximum"):
        C.draft_contract(recipe, folder, authorized_by=["alice"], valid_for=timedelta(days=10),
                         max_validity=timedelta(days=5))


@pytest.mark.parametrize("value", ["../x", "/abs", "a/b", "..", "a..b", ".x", "", "x" * 65, "a\\b", "a\nb", None, 5])
def test_run_ids_are_names(value):
    assert not C.valid_run_id(value)
    with pytest.raises(ContractError, match="plain run name"):
        C.check_run_id(value)


def test_planned_run_id_validates_before_anything_is_written(proj, tmp_path):
    recipe, folder, _ = proj
    good = C.draft_contract(recipe, folder, authorized_by=["alice"], run_id="run-1")
    body = C.ContractBody.model_construct(**{**dict(good.body), "session_id": "../../escape"})
    path = tmp_path / "c.yaml"
    path.write_text(C.dump_contract(C.Contract.model_construct(body=body, signatures=())))
    assert G.planned_run_id(recipe, path) is None  # unreadable contract: the recipe's id (None: generated)
    with pytest.raises(ContractError, match="plain run name"):
        G.authorize_run(recipe, folder, run_id="../../escape", run_dir=tmp_path / ".." / ".." / "escape",
                        self_approve=True, echo=lambda s: None)
    assert not (tmp_path.parent.parent / "escape").exists()


def test_legacy_version_1_contracts_are_refused_with_the_reason(proj):
    recipe, folder, _ = proj
    text = C.dump_contract(C.draft_contract(recipe, folder, authorized_by=["alice"])).replace(
        "contract_version: 2", "contract_version: 1")
    with pytest.raises(ContractError, match="binds only config.json"):
        C.parse_contract(text)


def test_self_approval_default(tmp_path, home, keys):
    """Off wherever the user's file names someone else to ask; explicit-only where nobody is named."""
    assert C.resolve_trust_policy(None).allow_self_approval is None  # no file: explicit only
    _write(home / "approvers.yaml", revoked=[{"key_id": keys["bob"].key_id}])
    assert C.resolve_trust_policy(None).allow_self_approval is None  # names nobody: explicit only
    _write(home / "approvers.yaml", approvers=[_entry(keys, "alice")])
    assert C.resolve_trust_policy(None).allow_self_approval is False  # alice is there to ask
    _write(home / "approvers.yaml", approvers=[_entry(keys, "alice")], allow_self_approval=True)
    assert C.resolve_trust_policy(None).allow_self_approval is True


def test_bytes_read_before_the_approval_are_verified_after_it(proj):
    """The data TOCTOU: the preflight reads (and hashes) the data, the file is restored before the gate
    hashes it; verify_read compares what was *read* with the approval and refuses."""
    _, folder, scope = proj
    data = folder / "train.jsonl"
    original = data.read_bytes()
    data.write_text('{"text": "poison"}\n')
    _, n, sha = C.read_and_hash(data)
    data.write_bytes(original)
    v = C.VerifiedScope.of(scope, folder)
    with pytest.raises(ContractError, match="bytes read .* are not the approved ones"):
        v.verify_read(data, n, sha)
    _, n, sha = C.read_and_hash(data)
    v.verify_read(data, n, sha)


def test_materialize_needs_a_new_folder_in_a_real_parent(proj, tmp_path):
    _, folder, scope = proj
    v = C.VerifiedScope.of(scope, folder)
    out = v.materialize("data", "train.jsonl", tmp_path / "d1")
    assert out.read_bytes() == (folder / "train.jsonl").read_bytes()
    with pytest.raises(ContractError, match="already exists"):
        v.materialize("data", "train.jsonl", tmp_path / "d1")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(ContractError, match="not a real folder"):
        v.materialize("model", "model", tmp_path / "link" / "m")
    assert not (tmp_path / "real" / "m").exists()
    default = v.materialize("probe_code", "probes")
    assert (default / "p.py").read_text() == "X = 1\n" and not (default / "__pycache__").exists()
