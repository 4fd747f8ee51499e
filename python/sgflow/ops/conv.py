r"""Dual (primal + tangent) 2-d convolution.

Shapes: ``x, x_dot: [B, Cin, H, W]``, ``weight: [Cout, Cin, kh, kw]``, ``bias: [Cout]`` or ``None``;
outputs ``y, y_dot: [B, Cout, Ho, Wo]``.

Forward
-------
Convolution is linear in its input, so the tangent is the same convolution without bias:

    y     = conv(x, W) + b
    y_dot = conv(x_dot, W)

Both are computed by ONE ``F.conv2d`` call on the stacked batch ``[x; x_dot]`` of size 2B (one kernel
launch, one pass over W) and split afterwards; the bias is added to the primal half only.

Backward
--------
With cotangents ``G = dL/dy`` and ``Gd = dL/dy_dot`` (either may be missing = zero):

    [dx; dxd] = conv^T([G; Gd], W)
    dW        = corr(x, G) + corr(x_dot, Gd) = corr([x; x_dot], [G; Gd])
    db        = sum_{b,h,w} G

dW comes from ONE ``aten.convolution_backward`` on the stacked batches, accumulated in one reduction
and rounded once (two weight gradients summed in bf16 round three times: that dW errs about 1.5x
exact math rounded to bf16); the same call returns both input gradients when both are wanted. A
missing cotangent is zero: its stream is left out of the stacks.

Only ``x`` and ``x_dot`` are saved (the concatenations are temporaries of forward and backward).

The Function has a ``setup_context`` and ``generate_vmap_rule`` so ``torch.func`` (vmap, grad, vjp)
composes with it.

Module layout (see docs/DESIGN.md): :func:`conv2d_dual_ref` (two plain convolutions),
:class:`Conv2dDual` (autograd.Function) and the functional API :func:`conv2d_dual`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sgflow.ops.backend import autocast_dual

__all__ = ["conv2d_dual_ref", "Conv2dDual", "conv2d_dual"]


def conv2d_dual_ref(x, x_dot, weight, bias=None, stride=1, padding=0):
    """Reference: ``(conv2d(x, W, b), conv2d(x_dot, W))`` with plain PyTorch calls."""
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    y_dot = F.conv2d(x_dot, weight, None, stride=stride, padding=padding)
    return y, y_dot


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _stack(a, b):
    """``[a; b]`` along the batch when both exist, else the one that does."""
    return a if b is None else b if a is None else torch.cat([a, b], 0)


class Conv2dDual(torch.autograd.Function):
    """``(x, x_dot, W, b) -> (conv(x, W) + b, conv(x_dot, W))`` on the stacked batch; see module doc."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_dot, weight, bias, stride, padding):
        batch = x.shape[0]
        both = F.conv2d(torch.cat([x, x_dot], 0), weight, None, stride=stride, padding=padding)
        y, y_dot = both[:batch], both[batch:]
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        else:
            # Two views of one buffer would alias the outputs; autograd wants distinct tensors.
            y = y.clone()
        return y, y_dot

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_dot, weight, bias, stride, padding = inputs
        ctx.save_for_backward(x, x_dot, weight)
        ctx.has_bias = bias is not None
        ctx.stride, ctx.padding = stride, padding
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad[:4]
        conf = (_pair(ctx.stride), _pair(ctx.padding), [1, 1], False, [0, 0], 1)

        def conv_backward(gg, xx, want_input, want_weight):
            mask = [want_input, want_weight, False]
            return torch.ops.aten.convolution_backward(gg, xx, weight, None, *conf, mask)[:2]

        dx = dxd = dw = db = None
        want_x, want_xd = need_x and g is not None, need_xd and g_dot is not None
        if need_w and (g is not None or g_dot is not None):
            # Input gradients from the same call when every stacked stream wants its own.
            joint = (want_x or g is None) and (want_xd or g_dot is None)
            gs, xs = _stack(g, g_dot), _stack(x if g is not None else None, x_dot if g_dot is not None else None)
            din, dw = conv_backward(gs, xs, joint, True)
            if joint:
                if g is not None and g_dot is not None:
                    dx, dxd = din.split(x.shape[0])
                elif g is not None:
                    dx = din
                else:
                    dxd = din
        if want_x and dx is None:
            dx = conv_backward(g, x, True, False)[0]
        if want_xd and dxd is None:
            dxd = conv_backward(g_dot, x_dot, True, False)[0]
        if need_b and ctx.has_bias and g is not None:
            db = g.sum((0, 2, 3))
        return dx, dxd, dw, db, None, None


def _check(x, x_dot, weight, bias):
    if x.dim() != 4:
        raise ValueError(f"conv2d_dual expects x of shape [B, C, H, W], got {tuple(x.shape)}")
    if x_dot.shape != x.shape:
        raise ValueError(f"x_dot has shape {tuple(x_dot.shape)} but x has shape {tuple(x.shape)}")
    if x_dot.dtype != x.dtype or x_dot.device != x.device:
        raise TypeError("x_dot must match x in dtype and device")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have shape [Cout, {x.shape[1]}, kh, kw] for x with {x.shape[1]} channels, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")


@autocast_dual
def conv2d_dual(x, x_dot, weight, bias=None, stride=1, padding=0):
    """Dual 2-d convolution: returns ``(conv2d(x, W, b), conv2d(x_dot, W))``.

    Args:
        x, x_dot: [B, Cin, H, W] primal and tangent.
        weight: [Cout, Cin, kh, kw]; bias: [Cout] or None (primal only: the tangent of a constant is 0).
        stride, padding: as for ``F.conv2d`` (int or pair).

    Returns:
        ``(y, y_dot)``, each [B, Cout, Ho, Wo]; differentiable in x, x_dot, weight and bias.
    """
    _check(x, x_dot, weight, bias)
    return Conv2dDual.apply(x, x_dot, weight, bias, stride, padding)
