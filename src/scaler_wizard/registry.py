"""One small registry type for everything a plugin can add: scaling strategies
(``scaling/strategies.py``), context methods (``context/methods.py``) and probes
(``evaluation/registry.py``).

A :class:`Registry` maps names to objects. Registration is checked, so a malformed plugin fails
when it is registered, never mid-run:

* the object passes the registry's ``check`` (which raises :class:`PluginError` saying what is
  missing);
* its name is a Python identifier (not a keyword);
* a name is registered once: a second, different object under the same name is refused unless
  ``replace=True`` (registering the very same object again is a no-op).

:meth:`Registry.load_entry_points` registers what installed packages advertise under the
registry's entry-point group, once per process. A plugin that fails in any way is reported (the
problems are returned and kept) and skipped; it never takes the built-ins or the other plugins
down; an entry point must be named like the object it loads. :meth:`Registry.get` names the known names (and the broken plugins) when a name is missing.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, Generic, TypeVar

from .errors import PluginError, ScalerWizardError

T = TypeVar("T")


def is_plugin_name(name: Any) -> bool:
    """A registrable name: a Python identifier that is not a keyword."""
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


class Registry(Generic[T]):
    """Named objects of one kind, with checked registration and entry-point discovery.

    ``kind`` names the objects in messages ("scaling strategy"); ``check(obj)`` raises
    :class:`PluginError` when ``obj`` is not usable; ``name_of(obj)`` gives its name (default:
    its ``name`` attribute); ``adapt(obj)`` turns what an entry point loads into the object to
    register (default: as loaded); ``unknown_error`` is the error type :meth:`get` raises, with
    ``unknown_hint`` after the list of known names.
    """

    def __init__(
        self,
        kind: str,
        *,
        group: str | None = None,
        check: Callable[[Any], None] | None = None,
        name_of: Callable[[Any], Any] | None = None,
        adapt: Callable[[Any], Any] | None = None,
        unknown_error: type[ScalerWizardError] = PluginError,
        unknown_hint: str | None = None,
    ) -> None:
        self.kind = kind
        self.group = group
        self._check = check
        self._name_of = name_of or (lambda obj: getattr(obj, "name", None))
        self._adapt = adapt
        self._unknown_error = unknown_error
        self._unknown_hint = unknown_hint
        self._items: dict[str, T] = {}
        self._problems: list[str] = []
        self._entry_points_loaded = False

    # -- registration ----------------------------------------------------------------------

    def register(self, obj: Any, *, replace: bool = False) -> T:
        """Add ``obj`` after checking it; returns it."""
        if self._check is not None:
            self._check(obj)
        name = self._name_of(obj)
        if not is_plugin_name(name):
            raise PluginError(
                f"The {self.kind} {obj!r} needs a `name` that is a Python identifier (got {name!r}).",
                hint="Set a class attribute such as name = 'my_plugin'.",
            )
        known = self._items.get(name)
        if known is not None and known is not obj and not replace:
            raise PluginError(
                f"A {self.kind} named {name!r} is already registered ({_type_name(known)}).",
                hint="Choose another name, or pass replace=True to override it on purpose.",
            )
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Remove a name (tests, or a plugin replacing a built-in on purpose); absent names are ignored."""
        self._items.pop(name, None)

    # -- entry points ----------------------------------------------------------------------

    def load_entry_points(self, *, reload: bool = False) -> list[str]:
        """Register the objects advertised under :attr:`group` (once, unless ``reload``).

        Returns the problems found, one line per broken plugin, instead of raising. With
        ``reload`` the entry points are read again and may replace what they registered before.
        """
        if self.group is None or (self._entry_points_loaded and not reload):
            return list(self._problems)
        self._problems.clear()
        for ep in metadata.entry_points(group=self.group):
            try:
                obj = ep.load()
                if self._adapt is not None:
                    obj = self._adapt(obj)
                name = self._name_of(obj)
                if name != ep.name:
                    raise PluginError(f"entry point {ep.name!r} loads a {self.kind} named {name!r}")
                self.register(obj, replace=reload)
            except Exception as exc:  # noqa: BLE001 - a plugin can fail in any way; report it, keep going
                where = getattr(ep, "value", None)
                origin = f"{ep.name} ({where})" if where else ep.name
                self._problems.append(f"{origin}: {type(exc).__name__}: {exc}")
        self._entry_points_loaded = True
        return list(self._problems)

    @property
    def entry_points_loaded(self) -> bool:
        return self._entry_points_loaded

    @property
    def problems(self) -> list[str]:
        """The broken plugins met by the last :meth:`load_entry_points`."""
        return list(self._problems)

    # -- lookup ----------------------------------------------------------------------------

    def get(self, name: str) -> T:
        """The object registered as ``name``; the error names every known name (and broken plugins)."""
        self.load_entry_points()
        if name not in self._items:
            broken = f" Plugins that failed to load: {'; '.join(self._problems)}." if self._problems else ""
            raise self._unknown_error(
                f"Unknown {self.kind} {name!r}; available: {', '.join(self.names())}.{broken}",
                hint=self._unknown_hint,
            )
        return self._items[name]

    def names(self) -> list[str]:
        """Every registered name, sorted (entry points loaded first)."""
        self.load_entry_points()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self.load_entry_points()
        return sorted(self._items.items())

    def copy(self) -> Registry[T]:
        """An independent registry with the same objects (e.g. built-ins plus one run's drop-ins)."""
        self.load_entry_points()
        twin: Registry[T] = Registry(
            self.kind, group=None, check=self._check, name_of=self._name_of, adapt=self._adapt,
            unknown_error=self._unknown_error, unknown_hint=self._unknown_hint,
        )
        twin._items = dict(self._items)
        twin._problems = list(self._problems)
        return twin

    def __contains__(self, name: object) -> bool:
        self.load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._items)})"


def _type_name(obj: Any) -> str:
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__
