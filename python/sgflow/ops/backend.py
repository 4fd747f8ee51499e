"""Backend selection for the dual ops: pure PyTorch, Triton, or the C++/CUDA extension sgflow._C.

The pure-PyTorch implementation of every dual op is the CPU backend and the fallback; the Triton and
C++/CUDA kernels sit behind the same ``torch.autograd.Function`` objects.

Backends:

- ``"torch"``: plain PyTorch (any device).
- ``"triton"``: Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``"cpp"``: the C++ CPU kernels of ``sgflow._C`` (CPU tensors). Ops without a C++ kernel (all but
  dual GroupNorm+SiLU and dual attention, see ``CPP_OPS``) run a ``"cpp"`` request on their torch
  implementation.
- ``"cuda"``: the CUDA kernels of ``sgflow._C`` (CUDA tensors; built only against a CUDA torch with a
  CUDA toolkit). Ops without one run a ``"cuda"`` request on their Triton kernels.
"""
from __future__ import annotations

import functools
import os

import torch

from sgflow.ops.library import once

BACKENDS = ("torch", "triton", "cpp", "cuda")

# Ops (their `op=` names in resolve_backend) that have kernels in the C++ extension (csrc/).
CPP_OPS = frozenset({"gn_silu", "attention"})

# Automatic choice per (op, device type): the first usable entry wins, else the generic default below.
# GN+SiLU on CPU: `python benchmarks/bench_cpp_gn_silu.py --threads 1 --isa all` (AMD EPYC Zen 4, fp32,
# cifar10 U-Net shapes [8, 256, H, H], 32 groups; forward + backward medians, torch backend -> C++ AVX-512):
# 32x32 39.0 -> 5.9 ms (6.6x), 16x16 11.7 -> 1.23 ms (9.5x), 8x8 2.12 -> 0.31 ms (6.8x); AVX2 3.8-7.8x;
# with 2 threads 5.6x-117x over several runs (a shared, loaded 2-core machine: the torch backend's many
# small parallel ops suffer most). So "cpp" is the CPU default where the extension is built. On CUDA,
# Triton stays the default: the CUDA kernels have not been timed against it on a GPU yet.
AUTO_BACKENDS = {
    ("gn_silu", "cpu"): ("cpp", "torch"),
    # Narrow heads only: sgflow.ops.attention._cpu_choice (measurements there).
    ("attention", "cpu"): ("cpp", "torch"),
}


@once
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
    from sgflow_kernels._env import interpreting

    return interpreting()


def _usable(choice: str, tensor: torch.Tensor) -> bool:
    """Whether an automatic choice can run on ``tensor``'s device here (never raises)."""
    from sgflow.ops import cpp_ext

    if choice == "cpp":
        return tensor.device.type == "cpu" and cpp_ext.available()
    if choice == "cuda":
        return tensor.is_cuda and cpp_ext.cuda_available()
    if choice == "triton":
        return tensor.is_cuda and triton_available()
    return choice == "torch"


def resolve_backend(tensor: torch.Tensor, backend: str | None = None, op: str | None = None) -> str:
    """Pick the backend for an op whose inputs live where ``tensor`` lives.

    Order: the explicit ``backend`` argument, then the ``SGFLOW_BACKEND`` environment variable, then the
    automatic choice: ``AUTO_BACKENDS[(op, device type)]`` where listed (the fastest available one as
    measured), else ``"triton"`` for CUDA tensors when Triton imports, else ``"torch"``. An explicit
    choice that cannot run here raises (with the reason) instead of silently falling back.

    ``op`` names the calling op (e.g. ``"gn_silu"``). With it, a ``"cpp"`` / ``"cuda"`` request for an op
    that has no C++ kernel (not in ``CPP_OPS``) resolves to ``"torch"`` / ``"triton"``; without it the
    request is returned as it is and the op maps it itself.
    """
    choice = backend if backend is not None else os.environ.get("SGFLOW_BACKEND") or None
    if choice is None:
        for cand in AUTO_BACKENDS.get((op, tensor.device.type), ()):
            if _usable(cand, tensor):
                return cand
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
    if choice in ("cpp", "cuda"):
        from sgflow.ops import cpp_ext

        if choice == "cpp" and tensor.device.type != "cpu":
            raise RuntimeError(
                f"backend 'cpp' runs the C++ CPU kernels and needs CPU tensors, got {tensor.device} "
                "(use 'cuda' or 'triton' for CUDA tensors)"
            )
        if choice == "cuda" and not tensor.is_cuda:
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got {tensor.device} (use 'cpp' or 'torch')")
        if not cpp_ext.available():
            raise RuntimeError(f"backend {choice!r} needs the C++ extension sgflow._C: {cpp_ext.reason()}")
        if choice == "cuda" and not cpp_ext.cuda_available():
            raise RuntimeError(
                "backend 'cuda' needs sgflow._C built with its CUDA kernels, but it was built without them "
                "(no CUDA build of torch or no CUDA toolkit at install; reinstall where both exist)"
            )
        if op is not None and op not in CPP_OPS:
            return "torch" if choice == "cpp" else "triton"
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
