"""Backend selection for the dual ops: pure PyTorch, Triton or CUDA C++.

The pure-PyTorch implementation of every dual op is the CPU backend and the fallback; the Triton and
CUDA kernels sit behind the same ``torch.autograd.Function`` objects.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it is a dependency, but keep CPU installs robust)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(tensor: torch.Tensor, backend: str | None = None) -> str:
    """Pick the backend for an op whose inputs live where ``tensor`` lives.

    Order: the explicit ``backend`` argument, then the ``SGFLOW_BACKEND`` environment variable, then
    ``"triton"`` for CUDA tensors when Triton imports, else ``"torch"``. An explicit choice that
    cannot run here raises instead of silently falling back.
    """
    choice = backend if backend is not None else os.environ.get("SGFLOW_BACKEND") or None
    if choice is None:
        if tensor.is_cuda and triton_available():
            return "triton"
        return "torch"
    choice = choice.lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown sgflow backend {choice!r}; expected one of {BACKENDS}")
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not importable")
        if not tensor.is_cuda and not triton_interpreting():
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing triton, or use backend='torch'"
            )
    if choice == "cuda":
        from sgflow.ops import cuda_ext

        if not tensor.is_cuda or not cuda_ext.available():
            raise RuntimeError("backend 'cuda' needs CUDA tensors and the compiled sgflow._C extension")
    return choice


def autocast_dual(fn):
    """Give a dual op autocast semantics: under ``torch.autocast`` its floating tensor arguments
    (activations, tangents, parameters) are cast to the autocast dtype and the op runs with
    autocast off, so primal, tangent and their backward all use one dtype (the ops keep group
    statistics and softmax accumulators in fp32 themselves). Outside autocast nothing changes.
    Parameter casts are ordinary differentiable ``.to``: their gradients come back in fp32.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or not torch.is_autocast_enabled(first.device.type):
            return fn(*args, **kwargs)
        device_type = first.device.type
        dtype = torch.get_autocast_dtype(device_type)

        def cast(a):
            return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

        with torch.autocast(device_type, enabled=False):
            return fn(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})

    return wrapper
