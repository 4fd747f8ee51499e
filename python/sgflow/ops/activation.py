r"""Dual (primal + tangent) elementwise SiLU.

Shapes: ``x, x_dot`` any shape (equal); outputs ``y, y_dot`` of the same shape.
With ``s = sigmoid(x)``:

    y      = x s
    y'     = s (1 + x (1 - s))                       (d silu / dx)
    y''    = s (1 - s) (2 + x (1 - 2 s))             (d^2 silu / dx^2)
    y_dot  = y' x_dot

Backward with cotangents ``G``, ``Gd`` (either may be missing):

    dx  = G y' + Gd x_dot y''
    dxd = Gd y'

Only ``x`` and ``x_dot`` are saved; s, y', y'' are recomputed (cheap elementwise). For fp16/bf16
inputs s, y', y'' and the sums above are formed in fp32 and rounded once to the input dtype: in bf16
the chain of roundings in y'' (and in the sum of the two terms of dx) made dx about 3x less accurate
than exact math rounded to bf16.

The Function has a ``setup_context`` and ``generate_vmap_rule`` so ``torch.func`` (vmap, grad, vjp)
composes with it.

Module layout (see docs/DESIGN.md): :func:`silu_dual_ref`, :class:`SiLUDual`, :func:`silu_dual`.
"""
from __future__ import annotations

import torch

from sgflow.ops.backend import autocast_dual
from sgflow_kernels.dtypes import acc_dtype as _acc_dtype

__all__ = ["silu_dual_ref", "SiLUDual", "silu_dual"]


def _silu_derivs(x):
    s = torch.sigmoid(x)
    d1 = s * (1 + x * (1 - s))
    return s, d1


def silu_dual_ref(x, x_dot):
    """Reference: ``(x sigmoid(x), silu'(x) x_dot)`` with explicit formulas (in x's dtype)."""
    s, d1 = _silu_derivs(x)
    return x * s, d1 * x_dot


class SiLUDual(torch.autograd.Function):
    """``(x, x_dot) -> (silu(x), silu'(x) x_dot)``; see module doc."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_dot):
        acc = _acc_dtype(x.dtype)
        xa = x.to(acc)
        s, d1 = _silu_derivs(xa)
        return (xa * s).to(x.dtype), (d1 * x_dot.to(acc)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_dot = inputs
        ctx.save_for_backward(x, x_dot)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot = ctx.saved_tensors
        acc = _acc_dtype(x.dtype)
        xa = x.to(acc)
        s, d1 = _silu_derivs(xa)
        dx = dxd = None
        if ctx.needs_input_grad[0]:
            if g is not None:
                dx = g.to(acc) * d1
            if g_dot is not None:
                d2 = s * (1 - s) * (2 + xa * (1 - 2 * s))
                term = g_dot.to(acc) * x_dot.to(acc) * d2
                dx = term if dx is None else dx + term
            dx = None if dx is None else dx.to(x.dtype)
        if ctx.needs_input_grad[1] and g_dot is not None:
            dxd = (g_dot.to(acc) * d1).to(x.dtype)
        return dx, dxd


@autocast_dual
def silu_dual(x, x_dot):
    """Dual SiLU: returns ``(silu(x), silu'(x) * x_dot)``, both of x's shape."""
    if x_dot.shape != x.shape:
        raise ValueError(f"x_dot has shape {tuple(x_dot.shape)} but x has shape {tuple(x.shape)}")
    if x_dot.dtype != x.dtype or x_dot.device != x.device:
        raise TypeError("x_dot must match x in dtype and device")
    return SiLUDual.apply(x, x_dot)
