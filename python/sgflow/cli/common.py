"""What every ``sgflow`` subcommand shares: the exit codes, :class:`CLIError` and the user errors that print
one line, and the parsing helpers (``key=value`` options, step counts, threads, device)."""
from __future__ import annotations

import json

import torch

EXIT_USER_ERROR = 1
EXIT_USAGE = 2


class CLIError(ValueError):
    """A user error found by the command line itself."""


def _user_errors() -> tuple:
    from sgflow.data import DatasetError
    from sgflow.distributed import DistributedError
    from sgflow.evaluate import EvalError
    from sgflow.train import CheckpointError, ConfigError, TrainingDiverged

    return (CLIError, ConfigError, CheckpointError, DatasetError, EvalError, DistributedError, TrainingDiverged,
            FileNotFoundError, NotADirectoryError, PermissionError, ImportError)


# ---------------------------------------------------------------------- parsing helpers
def _parse_value(text: str):
    """``k=v`` values: JSON literals (numbers, true/false, null, lists) else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_kv(items, what: str) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise CLIError(f"{what} options are key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k:
            raise CLIError(f"{what} option {item!r} has an empty key")
        out[k] = _parse_value(v)
    return out


def _positive_ints(values, what: str) -> tuple:
    if not values or any(v < 1 for v in values):
        raise CLIError(f"{what} must be positive integers, got {values}")
    return tuple(values)


def _set_threads(n):
    if n is not None:
        if n < 1:
            raise CLIError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def _device(arg: str) -> str:
    if arg in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {arg} asked for but CUDA is not available")
    return arg
