"""Probe discovery: the built-ins, the entry-point group ``scaler_wizard.probes``, and user
drop-in folders named in the recipe (``evaluation.probe_dirs``: every ``*.py`` file there may
define probe classes, i.e. classes with a ``name`` attribute and a ``run(model, length, ctx)``
method returning a :class:`ProbeResult`).

A file or entry point that fails to import is reported and skipped; a probe that raises while
running becomes an error result (``run_probe``); neither takes the run down.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import PluginError
from .probes import BUILTIN_PROBES

ENTRY_POINT_GROUP = "scaler_wizard.probes"


@dataclass
class ProbeCatalog:
    """Probe classes by name, and the problems met while discovering them."""

    classes: dict[str, type] = field(default_factory=lambda: dict(BUILTIN_PROBES))
    problems: list[str] = field(default_factory=list)

    def create(self, name: str, **options: Any) -> Any:
        if name not in self.classes:
            raise PluginError(
                f"Unknown probe '{name}'.", hint=f"Available: {', '.join(sorted(self.classes))}."
            )
        try:
            return self.classes[name](**options)
        except TypeError as exc:
            raise PluginError(f"Probe '{name}' rejected its options {options}: {exc}") from None


def _is_probe_class(obj: Any) -> bool:
    return (
        inspect.isclass(obj)
        and isinstance(getattr(obj, "name", None), str)
        and callable(getattr(obj, "run", None))
    )


def _add(catalog: ProbeCatalog, cls: type, origin: str) -> None:
    name = cls.name
    if not name.isidentifier():
        catalog.problems.append(f"{origin}: probe name {name!r} is not a simple identifier")
    elif name in catalog.classes and catalog.classes[name] is not cls:
        catalog.problems.append(f"{origin}: probe '{name}' is already defined; skipped")
    else:
        catalog.classes[name] = cls


def load_probe_file(path: Path) -> list[type]:
    """Import one drop-in file under a private module name and return its probe classes."""
    spec = importlib.util.spec_from_file_location(f"scaler_wizard_user_probe_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise PluginError(f"Cannot import probe file {path}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [obj for obj in vars(module).values() if _is_probe_class(obj) and obj.__module__ == module.__name__]


def discover_probes(probe_dirs: list[Path] | None = None) -> ProbeCatalog:
    catalog = ProbeCatalog()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if not _is_probe_class(obj):
                raise PluginError("not a probe class (needs a `name` and a `run` method)")
            _add(catalog, obj, f"entry point {ep.name}")
        except Exception as exc:  # noqa: BLE001 - a plugin may fail in any way
            catalog.problems.append(f"entry point {ep.name}: {exc}")
    for folder in probe_dirs or []:
        if not folder.is_dir():
            catalog.problems.append(f"probe folder {folder} does not exist")
            continue
        for path in sorted(folder.glob("*.py")):
            try:
                for cls in load_probe_file(path):
                    _add(catalog, cls, str(path))
            except Exception as exc:  # noqa: BLE001 - user code may fail in any way
                catalog.problems.append(f"{path}: {type(exc).__name__}: {exc}")
    if catalog.problems:
        warnings.warn("Probe discovery: " + "; ".join(catalog.problems), stacklevel=2)
    return catalog
