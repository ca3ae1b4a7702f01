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
from pathlib import Path
from typing import Any

from ..errors import PluginError
from ..registry import Registry
from .probes import BUILTIN_PROBES

ENTRY_POINT_GROUP = "scaler_wizard.probes"


def _check_probe_class(obj: Any) -> None:
    if not _is_probe_class(obj):
        raise PluginError(f"{obj!r} is not a probe class (needs a `name` and a `run` method)")


def _is_probe_class(obj: Any) -> bool:
    return (
        inspect.isclass(obj)
        and isinstance(getattr(obj, "name", None), str)
        and callable(getattr(obj, "run", None))
    )


def _new_registry() -> Registry[type]:
    return Registry(
        "probe", group=ENTRY_POINT_GROUP, check=_check_probe_class, unknown_error=PluginError,
        unknown_hint="Name a built-in probe, one from the 'scaler_wizard.probes' entry points, or a class in "
        "a file of evaluation.probe_dirs.",
    )


#: The built-in probes and the entry-point plugins (loaded on first use). Each
#: :func:`discover_probes` works on a copy, so one run's drop-in files never leak into another.
PROBES: Registry[type] = _new_registry()
for _cls in BUILTIN_PROBES.values():
    PROBES.register(_cls)


@dataclass
class ProbeCatalog:
    """Probe classes by name (a :class:`Registry`), and the problems met while discovering them."""

    registry: Registry[type] = field(default_factory=PROBES.copy)
    problems: list[str] = field(default_factory=list)

    @property
    def classes(self) -> dict[str, type]:
        return dict(self.registry.items())

    def add(self, cls: type, origin: str) -> None:
        """Register a discovered class; a bad or clashing one becomes a problem, not an error."""
        try:
            self.registry.register(cls)
        except PluginError as exc:
            self.problems.append(f"{origin}: {exc}")

    def create(self, name: str, **options: Any) -> Any:
        cls = self.registry.get(name)
        try:
            return cls(**options)
        except TypeError as exc:
            raise PluginError(f"Probe '{name}' rejected its options {options}: {exc}") from None


def load_probe_file(path: Path) -> list[type]:
    """Import one drop-in file under a private module name and return its probe classes."""
    spec = importlib.util.spec_from_file_location(f"scaler_wizard_user_probe_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise PluginError(f"Cannot import probe file {path}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [obj for obj in vars(module).values() if _is_probe_class(obj) and obj.__module__ == module.__name__]


def discover_probes(probe_dirs: list[Path] | None = None) -> ProbeCatalog:
    """The built-ins, the entry points and every probe class in the ``*.py`` files of ``probe_dirs``.
    Problems (a broken plugin or file, a missing folder, a clashing name) are collected and warned
    about once, never raised."""
    catalog = ProbeCatalog(problems=[f"entry point {p}" for p in PROBES.load_entry_points()])
    for folder in probe_dirs or []:
        if not folder.is_dir():
            catalog.problems.append(f"probe folder {folder} does not exist")
            continue
        for path in sorted(folder.glob("*.py")):
            try:
                classes = load_probe_file(path)
            except Exception as exc:  # noqa: BLE001 - user code may fail in any way
                catalog.problems.append(f"{path}: {type(exc).__name__}: {exc}")
                continue
            for cls in classes:
                catalog.add(cls, str(path))
    if catalog.problems:
        warnings.warn("Probe discovery: " + "; ".join(catalog.problems), stacklevel=2)
    return catalog
