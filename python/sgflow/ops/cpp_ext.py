"""The C++/CUDA extension ``sgflow._C`` (built from csrc/ by setup.py): loading, status, op wrappers.

Importing ``sgflow._C`` (a Python extension module) loads the library, whose ``TORCH_LIBRARY(sgflow, m)``
registers the ops ``torch.ops.sgflow.gn_silu_dual_{fwd,fwd_out,bwd,bwd_out}`` with CPU kernels, and
CUDA kernels too when it was built with CUDA. :func:`load` does that once, lazily, and adds the ops'
fake (meta) implementations so ``torch.library.opcheck``, ``torch.compile`` and ``FakeTensorMode`` can
trace them, and the forward's autograd formula (the backward op); load the extension through this module, not by importing ``sgflow._C`` directly.

The extension is optional: where it was not built (no C++ compiler at install, ``SGFLOW_BUILD_CPP=0``)
or does not import (torch upgraded since the build), :func:`available` is False, :func:`reason` says
why, and sgflow runs on its torch / Triton backends.
"""
from __future__ import annotations

import importlib.util

import torch

__all__ = [
    "load", "available", "cuda_available", "reason", "cpu_isa", "gn_silu_dual_fwd", "gn_silu_dual_bwd",
]

_REBUILD = "reinstall with `pip install -v --no-build-isolation -e .` (needs a C++ compiler) to build it"


_LOADED: tuple | None = None


def _load():
    """(module, None) or (None, reason), computed once.

    Cached in a module global, not functools.lru_cache: torch.compile inlines an lru_cache'd function's
    body on every trace (re-running the fake registration, a graph break), while it reads a global as a
    constant.
    """
    global _LOADED
    if _LOADED is None:
        _LOADED = _load_uncached()
    return _LOADED


def _load_uncached():
    if importlib.util.find_spec("sgflow._C") is None:
        return None, f"sgflow._C is not built (the install skipped it or its build failed); {_REBUILD}"
    try:
        from sgflow import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # e.g. built against another torch: undefined symbols
        return None, f"sgflow._C does not import ({exc}); {_REBUILD}"
    _register_fakes()
    return _C, None


def load():
    """The compiled module ``sgflow._C`` (ops registered), or None where it is unavailable."""
    return _load()[0]


def available() -> bool:
    """True when ``sgflow._C`` imports: the C++ CPU kernels (backend ``"cpp"``) are usable."""
    return load() is not None


def cuda_available() -> bool:
    """True when ``sgflow._C`` was built with its CUDA kernels (backend ``"cuda"``)."""
    mod = load()
    return bool(mod is not None and getattr(mod, "with_cuda", 0))


def blas_available() -> bool:
    """True when the C++ dual attention runs heads wider than 8 as query-row tiles on the BLAS torch links
    (csrc/attention_dual_cpu_blas.cpp): ``sgflow._C`` is built, found ``sgemm_`` / ``dgemm_`` and checked them, and
    the path is not switched off (``torch.ops.sgflow._attention_blas``)."""
    return load() is not None and bool(torch.ops.sgflow._attention_blas())


def cpu_kernels_apply(*tensors) -> bool:
    """The C++ CPU kernels can take these tensors: the first on the CPU in float32 / float64, the others (None
    skipped) of its dtype, and ``sgflow._C`` built."""
    x = tensors[0]
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if any(t is not None and t.dtype != x.dtype for t in tensors):
        return False
    return available()


def reason() -> str:
    """Why the extension is unavailable ('' when it is available)."""
    return _load()[1] or ""


def cpu_isa(isa: str | None = None) -> str:
    """The instruction set of the C++ CPU kernels (``"base"``, ``"avx2"``, ``"avx512"``); with ``isa``,
    switch to it first (it must be supported by the CPU). The start value is the fastest supported
    one, or ``$SGFLOW_CPU_ISA``."""
    if load() is None:
        raise RuntimeError(reason())
    return torch.ops.sgflow._cpu_isa(isa)


def _supported_isas() -> list[str]:
    """The instruction-set copies of the C++ CPU kernels this CPU runs (tests run each), [] without _C."""
    if load() is None:
        return []
    current, found = cpu_isa(), []
    for name in ("base", "avx2", "avx512"):
        try:
            cpu_isa(name)
            found.append(name)
        except RuntimeError:
            pass
    cpu_isa(current)
    return found


# ----------------------------------------------------------------------------------------------------
# op wrappers: drop-in replacements of the torch backend's _gn_silu_dual_{fwd,bwd}_torch
# ----------------------------------------------------------------------------------------------------
def gn_silu_dual_fwd(x, x_dot, weight, bias, num_groups: int, eps: float, mask=None, drop_scale: float = 1.0,
                     out=None):
    """Dual GroupNorm -> SiLU forward by the C++ kernels (CPU or CUDA, following x's device).

    With ``n = (x - mu) r gamma + beta`` (``mu``, ``r = (var + eps)^-1/2`` per (sample, group)):
    ``y = silu(n)``, ``y_dot = silu'(n) n_dot``, ``n_dot = r gamma (x_dot - <x_dot> - xh <xh x_dot>)``,
    ``xh = (x - mu) r``, both times ``mask * drop_scale`` when a dropout mask is given.

    Args:
        x, x_dot: [B, C, *spatial] (any strides; fp32/fp64/bf16/fp16); weight, bias: [C] or None.
        mask: optional bool [B, C, *spatial] dropout keep-mask shared by both streams.
        out: optional contiguous [2B, C, *spatial] buffer of x's dtype: y goes to ``out[:B]``, y_dot
            to ``out[B:]``.

    Returns:
        (y, y_dot, stats): y, y_dot [B, C, *spatial] contiguous in x's dtype (the halves of ``out`` if
        given); stats [4, B, G] (mean, rstd, mean_dot, rstd_dot) in fp32, fp64 for fp64 x.
    """
    from sgflow.ops.groupnorm_silu import _fwd

    return _fwd("cpp", x, x_dot, weight, bias, num_groups, eps, mask=mask, drop_scale=drop_scale, out=out)


def gn_silu_dual_bwd(x, x_dot, weight, bias, stats, g_y, g_ydot, num_groups: int, mask=None,
                     drop_scale: float = 1.0, out=None):
    """Dual GroupNorm -> SiLU backward by the C++ kernels (formulas: sgflow.ops.groupnorm_silu).

    Args:
        x, x_dot, weight, bias, mask, drop_scale: as given to the forward; stats: [4, B, G] from it.
        g_y, g_ydot: [B, C, *spatial] cotangents of y and y_dot, either may be None.
        out: optional contiguous [2B, C, *spatial] buffer of x's dtype: g_x goes to ``out[:B]``,
            g_xdot to ``out[B:]``. It may be the buffer whose halves are g_y and g_ydot themselves.

    Returns:
        (g_x, g_xdot, g_weight, g_bias): g_x [B, C, *spatial] in x's dtype (zeros when both cotangents
        are None), g_xdot likewise or None when g_ydot is None, g_weight / g_bias [C] in fp32 (fp64
        for fp64 x); the caller casts them and drops those of absent parameters.
    """
    from sgflow.ops.groupnorm_silu import _bwd

    return _bwd("cpp", x, x_dot, weight, bias, stats, g_y, g_ydot, num_groups, mask=mask, drop_scale=drop_scale,
                out=out)


# ----------------------------------------------------------------------------------------------------
# fake implementations (shapes and dtypes only, for tracing) and autograd: the torch backend's, same schemas
# ----------------------------------------------------------------------------------------------------
def _register_fakes() -> None:
    from sgflow.ops import groupnorm_silu as gs

    for name, fake in (("gn_silu_dual_fwd", gs._fwd_fake), ("gn_silu_dual_fwd_out", gs._fwd_out_fake),
                       ("gn_silu_dual_bwd", gs._bwd_fake), ("gn_silu_dual_bwd_out", gs._bwd_out_fake)):
        torch.library.register_fake(f"sgflow::{name}", fake)
    # The forward's autograd formula is its backward op, as for the torch and Triton twins.
    torch.library.register_autograd("sgflow::gn_silu_dual_fwd", gs._fwd_autograd(torch.ops.sgflow.gn_silu_dual_bwd),
                                    setup_context=gs._fwd_setup_context)
    from sgflow.ops.library import register_loop_vmap

    register_loop_vmap("sgflow::gn_silu_dual_fwd")
    register_loop_vmap("sgflow::gn_silu_dual_bwd")
    # The dual GELU / SiLU kernels (sgflow.ops.pointwise): contiguous results of x's shape and dtype.
    torch.library.register_fake("sgflow::pointwise_dual_fwd", _pointwise_fwd_fake)
    torch.library.register_fake("sgflow::pointwise_dual_bwd", _pointwise_bwd_fake)
    torch.library.register_fake("sgflow::pointwise_dual_bwd_", _pointwise_bwd_inplace_fake)
    # The dual product with a broadcast factor (sgflow.ops.scale; ScaleDual is the autograd Function).
    torch.library.register_fake("sgflow::scale_dual_fwd", _scale_fwd_fake)
    torch.library.register_fake("sgflow::scale_dual_bwd", _scale_bwd_fake)
    # The dual attention (sgflow.ops.attention): the torch backend's fakes, autograd and FLOP formulas.
    from torch.utils.flop_counter import register_flop_formula

    from sgflow.ops import attention as at

    torch.library.register_fake("sgflow::attention_dual_fwd_cpu", at._fwd_fake)
    torch.library.register_fake("sgflow::attention_dual_bwd_cpu", at._bwd_fake)
    torch.library.register_autograd("sgflow::attention_dual_fwd_cpu", at._op_autograd(torch.ops.sgflow.attention_dual_bwd_cpu),
                                    setup_context=at._setup_context)
    register_flop_formula(torch.ops.sgflow.attention_dual_fwd_cpu)(at._fwd_flops)
    register_flop_formula(torch.ops.sgflow.attention_dual_bwd_cpu)(at._bwd_flops)
    register_loop_vmap("sgflow::attention_dual_fwd_cpu")
    register_loop_vmap("sgflow::attention_dual_bwd_cpu")


def _pointwise_fwd_fake(x, x_dot, kind):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x, memory_format=torch.contiguous_format)


def _scale_fwd_fake(x, x_dot, s, s_dot):
    return _pointwise_fwd_fake(x, x_dot, None)  # (y, y_dot): contiguous, x's shape and dtype


def _scale_bwd_fake(x, x_dot, s, s_dot, g, g_dot):
    like = (x, x, s, s)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in like)


def _pointwise_bwd_inplace_fake(x, x_dot, g, g_dot, kind):
    return None


def _pointwise_bwd_fake(x, x_dot, g, g_dot, kind):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, None if g_dot is None else torch.empty_like(x, memory_format=torch.contiguous_format)
