"""The one Registry type behind strategies, context methods and probes."""

from __future__ import annotations

from importlib import metadata

import pytest

from scaler_wizard.errors import PluginError, UnsupportedMethodError
from scaler_wizard.registry import Registry


class Thing:
    def __init__(self, name: str, ok: bool = True):
        self.name, self.ok = name, ok


def check(obj):
    if not getattr(obj, "ok", False):
        raise PluginError(f"{obj!r} is not ok")


def test_checked_registration_and_lookup():
    reg = Registry("thing", check=check, unknown_error=UnsupportedMethodError, unknown_hint="Add one.")
    a = reg.register(Thing("alpha"))
    assert reg.register(a) is a  # the same object again is a no-op
    with pytest.raises(PluginError, match="already registered"):
        reg.register(Thing("alpha"))
    b = reg.register(Thing("alpha"), replace=True)
    assert reg.get("alpha") is b
    with pytest.raises(PluginError, match="not ok"):
        reg.register(Thing("beta", ok=False))
    for bad in ("not an identifier", "class", "", None):
        with pytest.raises(PluginError, match="identifier"):
            reg.register(Thing(bad))
    reg.register(Thing("gamma"))
    assert reg.names() == ["alpha", "gamma"] and "gamma" in reg and len(reg) == 2
    with pytest.raises(UnsupportedMethodError, match=r"Unknown thing 'delta'; available: alpha, gamma\. Add one\."):
        reg.get("delta")
    twin = reg.copy()
    twin.register(Thing("delta"))
    assert "delta" not in reg and twin.get("delta").name == "delta"
    reg.unregister("gamma")
    reg.unregister("gamma")
    assert reg.names() == ["alpha"]


def test_entry_points_loaded_once_and_broken_ones_reported(monkeypatch):
    class EP:
        def __init__(self, name, obj, value="pkg:obj"):
            self.name, self._obj, self.value = name, obj, value

        def load(self):
            if isinstance(self._obj, Exception):
                raise self._obj
            return self._obj

    calls = []

    def fake_entry_points(group=None):
        calls.append(group)
        return [EP("good", Thing("good")), EP("renamed", Thing("other")), EP("gone", ImportError("no module x"))]

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    reg = Registry("thing", group="test.things", check=check)
    problems = reg.load_entry_points()
    assert reg.names() == ["good"] and calls == ["test.things"]  # names() did not read them again
    assert len(problems) == 2
    assert any("renamed" in p and "named 'other'" in p for p in problems)
    assert any("gone (pkg:obj): ImportError: no module x" in p for p in problems)
    with pytest.raises(PluginError, match="Plugins that failed to load: .*gone"):
        reg.get("missing")
    assert reg.load_entry_points(reload=True) == problems and len(calls) == 2
