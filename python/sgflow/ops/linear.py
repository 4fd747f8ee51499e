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

    dx  = G W,     dxd = Gd W,     dW = G^T x + Gd^T x_dot,     db = sum_rows G

Only ``x``, ``x_dot`` (and W) are saved.

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


class LinearDual(torch.autograd.Function):
    """``(x, x_dot, W, b) -> (x W^T + b, x_dot W^T)`` on the stacked rows; see module doc."""

    @staticmethod
    def forward(ctx, x, x_dot, weight, bias):
        n = x.shape[0]
        both = torch.cat([x, x_dot], 0) @ weight.t()
        y, y_dot = both[:n], both[n:]
        y = y + bias if bias is not None else y.clone()
        ctx.save_for_backward(x, x_dot, weight)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return y, y_dot

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad
        dx = dxd = dw = db = None
        if need_x and g is not None:
            dx = g @ weight
        if need_xd and g_dot is not None:
            dxd = g_dot @ weight
        din, dout = weight.shape[1], weight.shape[0]
        if need_w:
            if g is not None:
                dw = g.reshape(-1, dout).t() @ x.reshape(-1, din)
            if g_dot is not None:
                dw_t = g_dot.reshape(-1, dout).t() @ x_dot.reshape(-1, din)
                dw = dw_t if dw is None else dw + dw_t
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
