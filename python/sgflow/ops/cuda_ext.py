"""Access to the optional CUDA C++ extension ``sgflow._C`` built from csrc/ by setup.py."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load():
    """The compiled module, or None where it was not built (CPU installs, SGFLOW_BUILD_CUDA=0)."""
    try:
        from sgflow import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def available() -> bool:
    """True when ``sgflow._C`` was built and imports."""
    return load() is not None
