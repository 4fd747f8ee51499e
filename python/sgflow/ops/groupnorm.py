r"""Dual (primal + tangent) GroupNorm without activation (the attention pre-norm).

Shapes: ``x, x_dot: [B, C, *spatial]``, ``weight, bias: [C]`` (or None), ``C % num_groups == 0``;
outputs ``y, y_dot`` of x's shape. Within one (sample, group) of n elements, means over the group:

Forward
-------
    mu = mean(x),  r = (mean((x - mu)^2) + eps)^(-1/2),   xh = r (x - mu)
    y  = w xh + b
    m  = mean(xh x_dot)
    dh = r (x_dot - mean(x_dot)) - r m xh          (= J x_dot, J = d xh / dx, symmetric)
    y_dot = w dh

Backward
--------
Cotangents ``G``, ``Gd``; write a = w G (cotangent of xh) and c = w Gd (cotangent of dh), and
J^T v = r (v - mean(v) - mean(v xh) xh) (the ordinary GroupNorm backward). Then

    dx_dot = J^T c
    dx     = J^T a - r mean(c dh) xh - r m J^T c - r mean(c xh) dh
    dw     = sum_{b, spatial} (G xh + Gd dh),       db = sum_{b, spatial} G

The three extra terms of dx are the second-order part d/dx <c, J(x) x_dot>: perturbing x by delta
changes r by -r^2 mean(xh delta), xh by J delta and m by mean((J delta) x_dot), which gives
<c, d dh> = -r mean(xh delta) <c, dh> - r m <c, J delta> - r mean(c xh) <x_dot, J delta>; J is
symmetric and J x_dot = dh.

Precision: statistics and all arithmetic run in fp32 for fp16/bf16 inputs (in the input dtype
otherwise); y, y_dot, dx, dx_dot come back in x's dtype, dw / db in the parameters' dtypes. In bf16,
centring around a bf16-rounded mean (inputs of mean 4) and the second-order terms made dx err about
3x exact math rounded to bf16.

Saved: x, x_dot and weight only; backward recomputes the per-(sample, group) statistics mu, r
([B, G] each, two reductions next to the dozen passes of the backward), so that the Function keeps
the modern ``setup_context`` form (which sees only inputs and outputs) and ``torch.func`` transforms
(vmap, grad) compose with it.

Module layout (see docs/DESIGN.md): :func:`groupnorm_dual_ref`, :class:`GroupNormDual` (applied by the
dual engine's GroupNorm rule, sgflow.autodual.rules, which casts half/bf16 and autocast inputs to fp32).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sgflow.normalization import moments, normalize_dual
from sgflow_kernels.dtypes import acc_dtype as _acc_dtype

__all__ = ["groupnorm_dual_ref", "GroupNormDual"]


def _grouped(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[B, C, *sp] -> [B, G, C/G, prod(sp)] (a view when x is contiguous)."""
    b, c = x.shape[:2]
    return x.reshape(b, num_groups, c // num_groups, -1)


def _affine(p: torch.Tensor | None, num_groups: int) -> torch.Tensor | None:
    return None if p is None else p.reshape(1, num_groups, -1, 1)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3), keepdim=True)


def _up(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _stats(xg: torch.Tensor, eps: float):
    """Per-(sample, group) mean and inverse std of grouped x [B, G, C/G, n] -> [B, G, 1, 1] each."""
    mu, _, var = moments(xg, (2, 3))
    return mu, torch.rsqrt(var + eps)


def _groupnorm_dual_forward(x, x_dot, weight, bias, num_groups, eps):
    """The formulas of the module doc in the accumulation dtype: ``(y, y_dot)`` in x's dtype."""
    acc = _acc_dtype(x.dtype)
    xg, dg = _grouped(x.to(acc), num_groups), _grouped(x_dot.to(acc), num_groups)
    xh, dh = normalize_dual(xg, dg, (2, 3), eps)
    w, b = _affine(_up(weight, acc), num_groups), _affine(_up(bias, acc), num_groups)
    y = xh if w is None else xh * w
    y_dot = dh if w is None else dh * w
    if b is not None:
        y = y + b
    return y.reshape(x.shape).to(x.dtype), y_dot.reshape(x.shape).to(x.dtype)


def groupnorm_dual_ref(x, x_dot, weight, bias, num_groups, eps=1e-5):
    """Reference with explicit formulas (see module doc); returns ``(y, y_dot)``."""
    return _groupnorm_dual_forward(x, x_dot, weight, bias, num_groups, eps)


class GroupNormDual(torch.autograd.Function):
    """``(x, x_dot, w, b) -> (group_norm(x), its JVP along x_dot)``; see module doc."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_dot, weight, bias, num_groups, eps):
        return _groupnorm_dual_forward(x, x_dot, weight, bias, num_groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_dot, weight, bias, num_groups, eps = inputs
        ctx.save_for_backward(x, x_dot, weight)
        ctx.num_groups, ctx.eps = num_groups, eps
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable  # first order only, like the other dual ops: a double backward raises (not verified)
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        ng = ctx.num_groups
        acc = _acc_dtype(x.dtype)
        xg, dg = _grouped(x.to(acc), ng), _grouped(x_dot.to(acc), ng)
        mu, r = _stats(xg, ctx.eps)
        xh = (xg - mu) * r
        m = _mean(xh * dg)
        dh = r * (dg - _mean(dg)) - r * m * xh
        w = _affine(_up(weight, acc), ng)
        gg = None if g is None else _grouped(g.to(acc), ng)
        gd = None if g_dot is None else _grouped(g_dot.to(acc), ng)

        def jt(v):
            return r * (v - _mean(v) - _mean(v * xh) * xh)

        dx = dxd = dw = db = None
        jtc = None
        if gd is not None:
            c = gd if w is None else gd * w
            jtc = jt(c)
        if ctx.needs_input_grad[0] and (gg is not None or gd is not None):
            dx = torch.zeros_like(xg)
            if gg is not None:
                dx = dx + jt(gg if w is None else gg * w)
            if gd is not None:
                dx = dx - r * _mean(c * dh) * xh - r * m * jtc - r * _mean(c * xh) * dh
            dx = dx.reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1] and jtc is not None:
            dxd = jtc.reshape(x.shape).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            acc_w = torch.zeros_like(xg)
            if gg is not None:
                acc_w = acc_w + gg * xh
            if gd is not None:
                acc_w = acc_w + gd * dh
            dw = acc_w.sum((0, 3)).reshape(-1).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3] and gg is not None:
            db = gg.sum((0, 3)).reshape(-1).to(ctx.bias_dtype)
        return dx, dxd, dw, db, None, None

