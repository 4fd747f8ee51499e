r"""Dual product with a per-sample, per-channel factor: ``(x, x_dot, s, s_dot) -> (x s, x_dot s + x s_dot)``.

The adaLN gates and scales of a DiT (``gate[:, None] * h``, ``norm(x) * (1 + scale[:, None])``) and FiLM
multipliers of a U-Net (``h * scale[:, :, None, None]``): ``s`` broadcasts over the positions of ``x``.

Shapes: ``x, x_dot`` ``[B, *dims]``; ``s, s_dot`` of ``x``'s rank or less (leading ones implied), each dim
1 or ``x``'s, the dims where it is not 1 after the batch dim consecutive (the channels): ``x`` is then a
``[B, R, C, K]`` view (R positions before the channels, K after) and ``s`` a ``[Bs, C]`` one, ``Bs`` being B
or 1 (a factor shared by the batch). :func:`scale_fits` gives the views, or None.

Forward
-------
    y = x s,        y_dot = x_dot s + x s_dot

Backward
--------
Cotangents ``G``, ``Gd`` of ``y``, ``y_dot``; sums over the dims where ``s`` broadcasts:

    dx = G s + Gd s_dot,   dx_dot = Gd s,   ds = sum (G x + Gd x_dot),   ds_dot = sum Gd x

Saved: x, x_dot, s, s_dot (what the product rule's three multiplications save). On CPU, float32/float64,
contiguous ``x``, each way is one C++ pass (``sgflow::scale_dual_{fwd,bwd}``, csrc/scale_dual_cpu.cpp,
where ``sgflow._C`` is built): as ATen ops it is 4 ops forward and about 12 backward. Elsewhere, and where
``torch.compile`` traces it (inductor fuses the ATen ops itself), :func:`_values_torch` /
:func:`_grads_torch`: 3 passes forward, 8 backward.

Module layout (see docs/DESIGN.md): :func:`scale_dual_ref` (plain PyTorch), :func:`scale_fits`,
:class:`ScaleDual` (applied by the dual engine's product rule, sgflow.autodual.rules.products, where both
operands carry a tangent), :func:`scale_dual` (the functional API).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["ScaleDual", "ScaleView", "scale_dual", "scale_dual_ref", "scale_fits", "CPP_KERNELS"]

# Use the C++ kernels where they apply (False: always the ATen path, e.g. to test it or to A/B it).
CPP_KERNELS = True


def scale_dual_ref(x, x_dot, s, s_dot):
    """Reference: ``(x s, x_dot s + x s_dot)`` with broadcasting, plain PyTorch."""
    return x * s, x_dot * s + x * s_dot


class ScaleView(NamedTuple):
    """How ``s`` broadcasts over ``x``: ``x`` as ``[B, R, C, K]``, ``s`` as ``[Bs, C]``."""
    B: int
    R: int
    C: int
    K: int
    Bs: int


def scale_fits(x_shape, s_shape) -> ScaleView | None:
    """The ``[B, R, C, K]`` / ``[Bs, C]`` views of ``x`` and a factor ``s`` broadcast over its positions, or None
    where ``s`` is not such a factor: more dims than ``x``, a dim neither 1 nor ``x``'s, its non-1 dims after
    the batch dim not consecutive, or nothing to broadcast over (the same shape as ``x``)."""
    x_shape, s_shape = tuple(x_shape), tuple(s_shape)
    n = len(x_shape)
    if n < 2 or len(s_shape) > n:
        return None
    s_shape = (1,) * (n - len(s_shape)) + s_shape
    b = x_shape[0]
    if s_shape[0] not in (1, b) or any(si not in (1, xi) for si, xi in zip(s_shape, x_shape)):
        return None
    dims = [i for i in range(1, n) if s_shape[i] != 1]
    if dims and dims != list(range(dims[0], dims[-1] + 1)):
        return None
    lo, hi = (dims[0], dims[-1] + 1) if dims else (n, n)
    view = ScaleView(b, math.prod(x_shape[1:lo]), math.prod(x_shape[lo:hi]), math.prod(x_shape[hi:]), s_shape[0])
    if view.R * view.K == 1 and view.Bs == view.B:
        return None  # an elementwise product of equal shapes: nothing broadcasts
    return view


def _use_cpp(*tensors) -> bool:
    """The C++ kernels apply: CPU float32/float64 tensors of one dtype, a contiguous activation, not traced,
    ``sgflow._C`` built."""
    if not CPP_KERNELS or torch.compiler.is_compiling() or not tensors[0].is_contiguous():
        return False
    from sgflow.ops import cpp_ext

    return cpp_ext.cpu_kernels_apply(*tensors)


def _values_torch(x, x_dot, s, s_dot):
    y = x * s
    y_dot = torch.mul(x_dot, s).addcmul_(x, s_dot)
    return y, y_dot


def _grads_torch(x, x_dot, s, s_dot, g, g_dot):
    dx = torch.mul(g, s).addcmul_(g_dot, s_dot)
    dxd = g_dot * s
    t = g_dot * x
    ds_dot = t.sum_to_size(s.shape)
    torch.mul(g, x, out=t).addcmul_(g_dot, x_dot)
    ds = t.sum_to_size(s.shape)
    return dx, dxd, ds, ds_dot


class ScaleDual(torch.autograd.Function):
    """``(x, x_dot, s, s_dot) -> (x s, x_dot s + x s_dot)``, ``s`` broadcast over ``x`` as :func:`scale_fits`
    allows (``view``: its result), saving x, x_dot, s, s_dot; backward by the formulas of the module doc."""

    @staticmethod
    def forward(ctx, x, x_dot, s, s_dot, view):
        ctx.view = view
        ctx.save_for_backward(x, x_dot, s, s_dot)
        if _use_cpp(x, x_dot, s, s_dot):
            b, r, c, k, bs = view
            y, y_dot = torch.ops.sgflow.scale_dual_fwd(x.view(b, r, c, k), x_dot.reshape(b, r, c, k),
                                                       s.reshape(bs, c), s_dot.reshape(bs, c))
            return y.view(x.shape), y_dot.view(x.shape)
        return _values_torch(x, x_dot, s, s_dot)

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, s, s_dot = ctx.saved_tensors
        # Not twice differentiable in C++: under create_graph the ATen formulas run (they are differentiable).
        if not torch.is_grad_enabled() and _use_cpp(x, x_dot, s, s_dot, g, g_dot):
            b, r, c, k, bs = ctx.view
            v4 = (b, r, c, k)
            dx, dxd, ds, dsd = torch.ops.sgflow.scale_dual_bwd(
                x.view(v4), x_dot.reshape(v4), s.reshape(bs, c), s_dot.reshape(bs, c), g.reshape(v4), g_dot.reshape(v4))
            return dx.view(x.shape), dxd.view(x.shape), ds.view(s.shape), dsd.view(s.shape), None
        if torch.is_grad_enabled():  # create_graph: out-of-place, differentiable formulas
            return (g * s + g_dot * s_dot, g_dot * s, (g * x + g_dot * x_dot).sum_to_size(s.shape),
                    (g_dot * x).sum_to_size(s.shape), None)
        dx, dxd, ds, dsd = _grads_torch(x, x_dot, s, s_dot, g, g_dot)
        return dx, dxd, ds, dsd, None


def _check(x, x_dot, s, s_dot) -> ScaleView:
    from sgflow.checks import check_like

    for name, t in (("x", x), ("s", s)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scale_dual: {name} must be a tensor, got {type(t).__name__}")
    check_like(x_dot, x, "scale_dual: x_dot", "x")
    check_like(s_dot, s, "scale_dual: s_dot", "s")
    if s.dtype != x.dtype or not x.dtype.is_floating_point:
        raise TypeError(f"scale_dual: x and s must share one floating dtype, got {x.dtype} and {s.dtype}")
    if s.device != x.device:
        raise ValueError(f"scale_dual: x is on {x.device} but s is on {s.device}")
    view = scale_fits(x.shape, s.shape)
    if view is None:
        raise ValueError(f"scale_dual: s {tuple(s.shape)} is not a per-sample, per-channel factor of x "
                         f"{tuple(x.shape)} (each dim 1 or x's, the non-1 dims after the batch dim consecutive, "
                         "and something to broadcast over)")
    return view


def scale_dual(x: torch.Tensor, x_dot: torch.Tensor, s: torch.Tensor, s_dot: torch.Tensor):
    """``(x s, x_dot s + x s_dot)``: the dual of ``x * s`` for a factor ``s`` broadcast over the positions of
    ``x`` (module doc).

    Args:
        x, x_dot: ``[B, *dims]``, any floating dtype and device (C++ on CPU float32/float64).
        s, s_dot: e.g. ``[B, 1, C]`` against ``[B, N, C]`` or ``[B, C, 1, 1]`` against ``[B, C, H, W]``; a
            batch dim of 1 shares the factor across the batch.

    Returns:
        ``(y, y_dot)`` of ``x``'s shape, differentiable in all four inputs.
    """
    view = _check(x, x_dot, s, s_dot)
    return ScaleDual.apply(x, x_dot, s, s_dot, view)
