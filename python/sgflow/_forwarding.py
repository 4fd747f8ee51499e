"""Module globals kept in one place when a module is split: ``forward_globals(__name__, {"NAME": home_module})``
makes reading or setting ``NAME`` on the re-exporting module read or set it on ``home_module``, the module whose
code reads it. A plain re-export would be a copy: setting it (a test's monkeypatch, a user's tuning) would
silently change nothing."""
from __future__ import annotations

import sys
import types


def forward_globals(module_name: str, homes: dict) -> None:
    """Turn ``sys.modules[module_name]`` into an instance of a ModuleType subclass with one property per name of
    ``homes`` (name -> home module): get and set go to the home module's global of that name."""
    def prop(name, home):
        return property(lambda self: getattr(home, name), lambda self, value: setattr(home, name, value))

    module = sys.modules[module_name]
    cls = type(f"_Forwarding_{module_name.replace('.', '_')}", (types.ModuleType,),
               {name: prop(name, home) for name, home in homes.items()})
    module.__class__ = cls
