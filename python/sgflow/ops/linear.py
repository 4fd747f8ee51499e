r"""Dual (primal + tangent) affine map.

Shapes: ``x, x_dot: [*, Din]``, ``weight: [Dout, Din]``, ``bias: [Dout]`` or ``None``; outputs
``y, y_dot: [*, Dout]``.

Forward
-------
    y     = x W^T + b
    y_dot = x_dot W^T

computed as ONE matmul on the stacked rows ``[x; x_dot]`` (one pass over W), bias on the primal only.

Backward
--------
With cotangents ``G``, ``Gd`` (either may be missing = zero), rows flattened over the leading dims:

    [dx; dxd] = [G; Gd] W,     dW = G^T x + Gd^T x_dot = [G; Gd]^T [x; x_dot],     db = sum_rows G

Both are ONE product on the stacked rows: dW is then accumulated by one GEMM and rounded once (two
products summed in bf16 round three times: their dW errs about 1.5x exact math rounded to bf16).
Only ``x``, ``x_dot`` (and W) are saved; the stacked copies are temporaries of the backward.

The Function has a ``setup_context`` and ``generate_vmap_rule`` so ``torch.func`` (vmap, grad, vjp)
composes with it.

Module layout (see docs/DESIGN.md): :func:`linear_dual_ref`, :class:`LinearDual`,
:func:`linear_dual`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sgflow.ops.backend import autocast_dual

__all__ = ["linear_dual_ref", "LinearDual", "linear_dual"]


def linear_dual_ref(x, x_dot, weight, bias=None):
    """Reference: ``(F.linear(x, W, b), F.linear(x_dot, W))``."""
    return F.linear(x, weight, bias), F.linear(x_dot, weight)


def _stack(a, b):
    """``[a; b]`` along rows when both exist, else the one that does (None if neither)."""
    if a is None or b is None:
        return a if b is None else b
    return torch.cat([a, b], 0)


class LinearDual(torch.autograd.Function):
    """``(x, x_dot, W, b) -> (x W^T + b, x_dot W^T)`` on the stacked rows; see module doc."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_dot, weight, bias):
        n = x.shape[0]
        both = torch.cat([x, x_dot], 0) @ weight.t()
        y, y_dot = both[:n], both[n:]
        # Two views of one buffer would alias the outputs; autograd wants distinct tensors.
        y = y + bias if bias is not None else y.clone()
        return y, y_dot

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_dot, weight, bias = inputs
        ctx.save_for_backward(x, x_dot, weight)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad
        dx = dxd = dw = db = None
        if g is None and g_dot is None:
            return dx, dxd, dw, db
        n, din, dout = x.shape[0], weight.shape[1], weight.shape[0]
        both = g is not None and g_dot is not None
        # Rows of the streams that have a cotangent (a missing one is zero and is left out).
        gs = _stack(g, g_dot) if need_w or (need_x and need_xd and both) else None
        if need_x and need_xd and both:
            dx, dxd = (gs @ weight).split(n)
        else:
            if need_x and g is not None:
                dx = g @ weight
            if need_xd and g_dot is not None:
                dxd = g_dot @ weight
        if need_w:
            xs = _stack(x if g is not None else None, x_dot if g_dot is not None else None)
            dw = gs.reshape(-1, dout).t() @ xs.reshape(-1, din)
        if need_b and ctx.has_bias and g is not None:
            db = g.reshape(-1, dout).sum(0)
        return dx, dxd, dw, db


@autocast_dual
def linear_dual(x, x_dot, weight, bias=None):
    """Dual linear layer: returns ``(x W^T + b, x_dot W^T)``.

    Args:
        x, x_dot: [N, ..., Din] primal and tangent (N >= 1 leading rows; extra leading dims allowed).
        weight: [Dout, Din]; bias: [Dout] or None (primal only).

    Returns:
        ``(y, y_dot)``, each [N, ..., Dout]; differentiable in x, x_dot, weight and bias.
    """
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_dual: x has shape {tuple(x.shape)} but weight expects {weight.shape[1]} input features")
    if x.dim() == 1:
        raise ValueError("linear_dual expects x of shape [N, ..., Din] (a leading batch dim)")
    if x_dot.shape != x.shape:
        raise ValueError(f"x_dot has shape {tuple(x_dot.shape)} but x has shape {tuple(x.shape)}")
    if x_dot.dtype != x.dtype or x_dot.device != x.device:
        raise TypeError("x_dot must match x in dtype and device")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    return LinearDual.apply(x, x_dot, weight, bias)
