"""sgflow._forwarding.forward_globals: a global re-exported by a split module reads and writes its home module
(the engine's tunables, e.g. ``sgflow.autodual.rules.ROW_SLICES``, live in the module whose code reads them)."""
import sys
import types

import pytest

from sgflow._forwarding import forward_globals


@pytest.fixture
def modules():
    home, front = types.ModuleType("_sg_home"), types.ModuleType("_sg_front")
    home.LIMIT = 8
    front.LIMIT = home.LIMIT  # the plain re-export a split leaves behind
    sys.modules[front.__name__] = front
    yield home, front
    sys.modules.pop(front.__name__, None)


def test_get_and_set_go_to_the_home_module(modules, monkeypatch):
    home, front = modules
    forward_globals(front.__name__, {"LIMIT": home})
    front.LIMIT = 3
    assert home.LIMIT == 3 and front.LIMIT == 3
    home.LIMIT = 5
    assert front.LIMIT == 5
    monkeypatch.setattr(front, "LIMIT", 1)
    assert home.LIMIT == 1
    monkeypatch.undo()
    assert home.LIMIT == 5


def test_without_it_a_re_export_is_a_copy(modules):
    home, front = modules
    front.LIMIT = 3
    assert home.LIMIT == 8  # what forward_globals prevents


@pytest.mark.parametrize("package, name, home", [
    ("sgflow.autodual.rules", "ROW_SLICES", "sgflow.ops.recompute"),
    ("sgflow.autodual.rules", "POINTWISE_CHUNK", "sgflow.ops.pointwise"),
    ("sgflow.autodual", "WRAPPER_SHARE", "sgflow.autodual.blocks"),
    ("sgflow.ops.groupnorm_silu", "CHUNK_ELEMENTS", "sgflow.ops.gn_silu_torch"),
])
def test_the_library_tunables_are_forwarded(package, name, home, monkeypatch):
    import importlib

    pkg, mod = importlib.import_module(package), importlib.import_module(home)
    sentinel = object()
    monkeypatch.setattr(pkg, name, sentinel)
    assert getattr(mod, name) is sentinel
