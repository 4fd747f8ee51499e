"""The app's optional dependencies (``pip install "sgflow[app]"``), imported where they are used.

``import sgflow`` and the losses need torch and numpy only; the CLI, the trainer's progress bar, the exact
flow maps of the mixtures (an ODE solve), image folders, the quality table and the figures need the
packages of the ``app`` extra. :func:`require` imports one of them and, when it is missing, says which
feature needs it and how to install it.
"""
from __future__ import annotations

import importlib

# The import name's top-level package -> the distribution that provides it.
DISTRIBUTIONS = {"matplotlib": "matplotlib", "PIL": "pillow", "tqdm": "tqdm", "torchdiffeq": "torchdiffeq"}

INSTALL_HINT = 'pip install "sgflow[app]"'


def missing_message(module: str, feature: str) -> str:
    dist = DISTRIBUTIONS.get(module.split(".")[0], module.split(".")[0])
    return f"{feature} needs {dist}, which sgflow's core does not install: {INSTALL_HINT} (or pip install {dist})"


def require(module: str, feature: str):
    """``importlib.import_module(module)``, or an ImportError naming ``feature`` and the ``app`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(missing_message(module, feature)) from exc
