"""Helpers for the batteries that drive the real command line (`scaler-wizard run ...` through
``cli.main``, in-process so each case costs a fraction of a second): a tiny real project (model
folder saved by transformers, data, recipe), keys and the user's trust file in a private
SCALER_WIZARD_HOME, a signed contract, and the checks every refused case must pass."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import DEMO_DATA, write_recipe

from scaler_wizard.recipe import load_recipe
from scaler_wizard.safety import contract as C

RUN_ID = "run-1"
PROBE_CODE = '''import os
from pathlib import Path

Path(os.environ["SW_PROBE_MARKER"]).write_text("probe code ran")


class MarkerProbe:
    name = "marker"

    def run(self, model, length, ctx):
        from scaler_wizard.evaluation.probes import ProbeResult

        return ProbeResult(self.name, length, {"x": 1.0})
'''


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass
class Project:
    tmp: Path
    root: Path
    home: Path
    recipe_path: Path
    contract_path: Path
    keys: dict[str, C.KeyFiles]
    marker: Path
    capsys: object
    extra: dict = field(default_factory=dict)

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def user_approvers(self) -> Path:
        return self.home / "approvers.yaml"

    def recipe(self):
        return load_recipe(self.recipe_path)

    def key(self, name: str):
        return C.load_private_key(self.keys[name].private)

    def draft(self, **kw) -> C.Contract:
        recipe, folder = self.recipe()
        kw.setdefault("authorized_by", ["alice", "bob"])
        kw.setdefault("run_id", RUN_ID)
        return C.draft_contract(recipe, folder, **kw)

    def sign(self, doc: C.Contract | None = None, *names: str) -> Path:
        doc = doc or self.draft()
        for n in names or ("alice",):
            doc = C.sign_contract(doc, self.key(n), n)
        self.contract_path.write_text(C.dump_contract(doc))
        return self.contract_path

    def tree_outside_runs(self) -> set[str]:
        """Every path under the test's folder except the runs folder, the user's home and the
        contract/recipe we wrote: what a refused run must leave unchanged."""
        out = set()
        for dirpath, dirnames, filenames in os.walk(self.tmp):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if here / d not in (self.runs, self.home)]
            for name in dirnames + filenames:
                out.add(str((here / name).relative_to(self.tmp)))
        return out

    def run(self, *args: str, contract: bool | Path = True, recipe: Path | None = None) -> Result:
        """`scaler-wizard run RECIPE [--contract FILE] ARGS...` through the real entry point."""

        argv = ["scaler-wizard", "run", str(recipe or self.recipe_path)]
        if contract is True:
            argv += ["--contract", str(self.contract_path)]
        elif contract:
            argv += ["--contract", str(contract)]
        argv += [str(a) for a in args]
        return invoke(argv, self.capsys)


def invoke(argv: list[str], capsys=None) -> Result:
    """Run ``cli.main`` with ``argv``; output captured by capsys, or by redirecting the streams."""
    import contextlib
    import io

    from scaler_wizard import cli

    old = sys.argv
    sys.argv = argv
    out, err = io.StringIO(), io.StringIO()
    if capsys is not None:
        capsys.readouterr()
    ctx = contextlib.nullcontext() if capsys is not None else contextlib.ExitStack()
    with ctx as stack:
        if stack is not None:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
        try:
            cli.main()
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = old
    if capsys is not None:
        captured = capsys.readouterr()
        return Result(rc, captured.out, captured.err)
    return Result(rc, out.getvalue(), err.getvalue())


def patch_after_authorization(monkeypatch, after) -> None:
    """Make every holder of ``authorize_run`` call ``after(grant)`` right after a successful
    authorization: the moment at which a time-of-check/time-of-use attacker swaps files."""
    from scaler_wizard.safety import gatekeeper as G

    real = G.authorize_run

    def wrapped(*args, **kwargs):
        grant = real(*args, **kwargs)
        after(grant)
        return grant

    for module in list(sys.modules.values()):
        if getattr(module, "authorize_run", None) is real and module.__name__.startswith("scaler_wizard"):
            monkeypatch.setattr(module, "authorize_run", wrapped)


def patch_before_authorization(monkeypatch, before) -> None:
    """Call ``before()`` just before the gate hashes the inputs."""
    from scaler_wizard.safety import gatekeeper as G

    real = G.authorize_run

    def wrapped(*args, **kwargs):
        before()
        return real(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "authorize_run", None) is real and module.__name__.startswith("scaler_wizard"):
            monkeypatch.setattr(module, "authorize_run", wrapped)


def audit_records(run_dir: Path) -> list[dict]:
    path = run_dir / "contract" / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def run_dirs(project: Project) -> list[Path]:
    if not project.runs.is_dir():
        return []
    return [p for p in project.runs.iterdir() if p.is_dir() and not p.name.startswith(".")]


def training_steps(run_dir: Path) -> int:
    """Optimizer steps the run logged (train/* metrics at a step > 0)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = set()
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if str(rec.get("metric", "")).startswith("train/") and int(rec.get("step", 0)) > 0:
            steps.add(int(rec["step"]))
    return len(steps)


def assert_refused(project: Project, result: Result, pattern: str | None = None, *, before: set[str] | None = None,
                   exit_code: int = 3) -> None:
    """Refused with a clean message (no traceback), 0 training steps, no model written, nothing
    created outside runs/, the marker of drop-in probe code absent."""
    assert result.rc == exit_code, (result.rc, result.text[-3000:])
    assert "Traceback" not in result.text, result.text[-3000:]
    if pattern is not None:
        import re

        assert re.search(pattern, " ".join(result.err.split())), result.err[-2000:]
    for d in run_dirs(project):
        assert training_steps(d) == 0, f"{d} trained"
        assert not (d / "adapter").exists() and not (d / "model").exists() and not (d / "summary.json").exists()
        status = json.loads((d / "status.json").read_text()) if (d / "status.json").is_file() else {}
        assert status.get("state") in (None, "rejected", "failed", "awaiting_approval"), status
    if before is not None:
        assert project.tree_outside_runs() == before, project.tree_outside_runs() ^ before
    assert not project.marker.exists(), "drop-in probe code ran before the approval"


@pytest.fixture(scope="session")
def tiny_model_template(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-template") / "model", "llama", tiny_tokenizer)


def make_project(tmp_path: Path, template: Path, monkeypatch, capsys, *, probes: bool = False, teacher: bool = False,
                 cache: bool = False, **overrides) -> Project:
    home = tmp_path / "home"
    monkeypatch.setenv(C.HOME_ENV, str(home))
    monkeypatch.delenv(C.APPROVERS_ENV, raising=False)
    monkeypatch.delenv(C.PASSPHRASE_ENV, raising=False)
    marker = tmp_path / "probe-ran.marker"
    monkeypatch.setenv("SW_PROBE_MARKER", str(marker))
    root = tmp_path / "proj"
    root.mkdir(parents=True)
    shutil.copytree(template, root / "model")
    shutil.copy(DEMO_DATA / "heldout.jsonl", root / "train.jsonl")
    opts = {"training__steps_per_stage": 1, "output__merge": False, "data__train": ["train.jsonl"],
            "model__path": "model"}
    if probes:
        (root / "probes").mkdir()
        (root / "probes" / "marker_probe.py").write_text(PROBE_CODE)
        opts.update(evaluation__probe_dirs=["probes"], evaluation__custom=[{"name": "marker"}])
    if teacher:
        shutil.copytree(template, root / "teacher")
        opts.update(distillation__enabled=True, distillation__teacher="model", distillation__teacher_path="teacher")
    if cache:
        (root / "cache").mkdir()
        (root / "cache" / "manifest.json").write_text(json.dumps({"version": 1}))
        (root / "cache" / "topk-00000.safetensors").write_bytes(b"\0" * 64)
        opts.update(distillation__enabled=True, distillation__teacher="offline", distillation__cache="cache")
    opts.update(overrides)
    recipe_path = write_recipe(root / "recipe.yaml", root / "model", root / "runs", **opts)
    keys = {n: C.generate_keypair(n, tmp_path / "keys") for n in ("alice", "bob", "mallory")}
    for n in ("alice", "bob"):
        C.add_trusted_approver(home / "approvers.yaml", n, keys[n].public_key)
    project = Project(tmp_path, root, home, recipe_path, tmp_path / "contract.yaml", keys, marker, capsys)
    project.sign()
    return project
