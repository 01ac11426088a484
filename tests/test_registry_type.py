"""The one registry type (autocompress._registry)."""

import pickle
import sys
import types

import pytest

from autocompress._errors import ConfigError
from autocompress._registry import Registry, UnknownNameError


def test_register_as_decorator_and_call():
    reg: Registry[object] = Registry("thing")

    @reg.register("a")
    def a():
        return 1

    reg.register("b", 2)
    assert reg.get("a") is a and reg.get("b") == 2
    assert reg.names() == ("a", "b") and "a" in reg and "c" not in reg and len(reg) == 2


def test_duplicate_is_refused():
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_unknown_name_says_closest_and_allowed_and_where():
    reg = Registry("sampler")
    reg.register("nsga2", 1)
    reg.register("tpe", 2)
    with pytest.raises(UnknownNameError) as info:
        reg.get("nsgaii", file="exp.yaml", key="search.sampler")
    msg = str(info.value)
    assert msg == ("exp.yaml: search.sampler: unknown sampler 'nsgaii' (did you mean 'nsga2'?); "
                   "allowed: nsga2, tpe")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)
    assert str(pickle.loads(pickle.dumps(info.value))) == msg


def test_names_are_live():
    reg = Registry("metric")
    seen = reg.names()
    reg.register("late", 1)
    assert seen == () and reg.names() == ("late",)


def test_builtins_are_named_without_import_and_loaded_on_get(monkeypatch):
    module = types.ModuleType("fake_builtin_entry")
    reg = Registry("task", builtins={"lazy": "fake_builtin_entry"})
    imported = []

    def fake_import(name):
        imported.append(name)
        reg.register("lazy", "loaded")
        return module

    monkeypatch.setattr("importlib.import_module", fake_import)
    assert reg.names() == ("lazy",) and "lazy" in reg and imported == []
    assert reg.get("lazy") == "loaded" and imported == ["fake_builtin_entry"]
    assert reg.get("lazy") == "loaded" and imported == ["fake_builtin_entry"]


def test_builtin_module_that_does_not_register_is_an_error(monkeypatch):
    reg = Registry("task", builtins={"ghost": "fake_ghost_module"})
    monkeypatch.setitem(sys.modules, "fake_ghost_module", types.ModuleType("fake_ghost_module"))
    with pytest.raises(RuntimeError, match="did not register task 'ghost'"):
        reg.get("ghost")


def test_mapping_views_keep_declaration_order(monkeypatch):
    reg = Registry("task", builtins={"b": "fake_b", "a": "fake_a"})

    def fake_import(name):
        reg.register(name[len("fake_"):], name.upper())

    monkeypatch.setattr("importlib.import_module", fake_import)
    assert reg["a"] == "FAKE_A" and reg.names() == ("b", "a")  # loading does not reorder
    reg.register("c", "C")
    assert reg.values() == ["FAKE_B", "FAKE_A", "C"]
    assert reg.items() == [("b", "FAKE_B"), ("a", "FAKE_A"), ("c", "C")]
    assert reg.load_all() == {"b": "FAKE_B", "a": "FAKE_A", "c": "C"}
    with pytest.raises(UnknownNameError):
        reg["d"]
    reg.unregister("a")
    assert reg.names() == ("b", "c")


def test_unknown_builds_the_error_get_raises():
    reg = Registry("method")
    reg.register("prune", 1)
    err = reg.unknown("prnue", key="methods")
    assert isinstance(err, UnknownNameError)
    assert str(err) == "methods: unknown method 'prnue' (did you mean 'prune'?); allowed: prune"
