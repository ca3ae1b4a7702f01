"""scripts/import_graph.py: no import cycles and no library module importing the pipeline or the CLI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from conftest import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


IG = _script()


def test_the_package_has_no_cycles_and_no_upward_arrows():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")], capture_output=True, check=False,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cycles (top-level imports): 0" in proc.stdout
    assert "upward arrows (library -> pipeline/cli): 0" in proc.stdout


def test_it_finds_cycles_lazy_cycles_and_upward_arrows(tmp_path):
    pkg = tmp_path / "scaler_wizard"
    files = {
        "__init__.py": "",
        "cli.py": "from .pipeline import run\n",
        "pipeline.py": "from . import lib\n",
        "lib.py": "from .sub.a import x\n\ndef f():\n    from scaler_wizard.pipeline import run\n",
        "sub/__init__.py": "",
        "sub/a.py": "from .b import y\nx = 1\n",
        "sub/b.py": "from typing import TYPE_CHECKING\nfrom . import a\ny = 2\nif TYPE_CHECKING:\n    from ..lib import f\n",
        "sub/c.py": "from .d import z\n",
        "sub/d.py": "z = 3\n\ndef g():\n    from .c import z\n",
        "sub/tool_cli.py": "from ..pipeline import run\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    result = IG.analyse(pkg)
    assert [c["modules"] for c in result["cycles"]] == [["scaler_wizard.sub.a", "scaler_wizard.sub.b"]]
    assert result["cycles"][0]["path"] == ["scaler_wizard.sub.a", "scaler_wizard.sub.b", "scaler_wizard.sub.a"]
    assert [c["modules"] for c in result["function_level_cycles"]] == [
        ["scaler_wizard.lib", "scaler_wizard.pipeline"], ["scaler_wizard.sub.c", "scaler_wizard.sub.d"]]
    # lib -> pipeline (inside a function) is upward; cli and a *_cli command module may import it
    assert [(e.source, e.target, e.kind) for e in result["upward_arrows"]] == [
        ("scaler_wizard.lib", "scaler_wizard.pipeline", "function")]
    text = IG.report(result)
    assert "sub.a -> sub.b -> sub.a" in text and "lib -> pipeline  [function, line 4]" in text
