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

Kernels
-------
J is block-diagonal over (sample, group), each block r (I - 11^T/n - xh xh^T/n) (n = C/G * spatial
elements), and symmetric, so J v = ``native_group_norm_backward`` applied to v (gamma None), and
J (w v) that kernel with gamma = w. The op runs: forward ``native_group_norm`` (y) and one kernel
backward on x_dot (dh, times w per channel); backward ``native_group_norm`` again (xh, mu, r), the
kernel backward on G (dx's J^T a, dw's sum G xh, db) and on Gd (dx_dot = J^T c) and on x_dot (dh),
then the second-order term -(r/n) (D xh + C dh + B dx_dot) with per-(sample, group) sums
B = <xh, x_dot>, C = <c, xh>, D = <c, dh> (products into one reused scratch, then sums). PyTorch gives
the kernel backward no derivative: first order only (once_differentiable, a double backward raises).
Inputs are made contiguous for the kernels (their backward reads mixed memory formats wrongly).

Precision: statistics and all arithmetic run in fp32 for fp16/bf16 inputs (in the input dtype
otherwise); y, y_dot, dx, dx_dot come back in x's dtype, dw / db in the parameters' dtypes. In bf16,
centring around a bf16-rounded mean (inputs of mean 4) and the second-order terms made dx err about
3x exact math rounded to bf16.

Saved: x, x_dot and weight only; backward recomputes the per-(sample, group) statistics mu, r
(one ``native_group_norm``), so that the Function keeps the modern ``setup_context`` form (which sees
only inputs and outputs) and ``torch.func`` transforms (vmap, grad) compose with it.

Module layout (see docs/DESIGN.md): :func:`groupnorm_dual_ref`, :class:`GroupNormDual` (applied by the
dual engine's GroupNorm rule, sgflow.autodual.rules, which casts half/bf16 and autocast inputs to fp32).
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from sgflow.normalization import normalize_dual
from sgflow_kernels.dtypes import acc_dtype as _acc_dtype

__all__ = ["groupnorm_dual_ref", "GroupNormDual"]


def _grouped(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[B, C, *sp] -> [B, G, C/G, prod(sp)] (a view when x is contiguous)."""
    b, c = x.shape[:2]
    return x.reshape(b, num_groups, c // num_groups, -1)


def _affine(p: torch.Tensor | None, num_groups: int) -> torch.Tensor | None:
    return None if p is None else p.reshape(1, num_groups, -1, 1)


def _up(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


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


_aten = torch.ops.aten


def _sizes(x: torch.Tensor):
    """(N, C, HxW) of ``x: [N, C, *spatial]`` as PyTorch's group-norm kernels take them."""
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def _per_channel(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return p.reshape((1, -1) + (1,) * (x.dim() - 2))


def _native_forward(x, x_dot, weight, bias, num_groups, eps):
    """``(y, y_dot)`` from the group-norm kernels (module doc, "Kernels"), in the accumulation dtype."""
    acc = _acc_dtype(x.dtype)
    xa, da = x.to(acc).contiguous(), x_dot.to(acc).contiguous()
    w, b = _up(weight, acc), _up(bias, acc)
    n, c, hw = _sizes(xa)
    y, mean, rstd = _aten.native_group_norm(xa, w, b, n, c, hw, num_groups, eps)
    t = _aten.native_group_norm_backward(da, xa, mean, rstd, None, n, c, hw, num_groups, [True, False, False])[0]
    if w is not None:
        t = t.mul_(_per_channel(w, t))
    return y.to(x.dtype), t.to(x.dtype)


def _group_dot(a: torch.Tensor, b: torch.Tensor, rows: int, scratch: torch.Tensor) -> torch.Tensor:
    """Sums of ``a * b`` over each of ``rows`` contiguous blocks -> [rows, 1, 1], the products written into
    ``scratch`` (a's size, reused by every sum of one backward). Not a bmm of [rows, 1, n] by [rows, n, 1]:
    with one-element outputs it ran 4-5x slower on CPU (0.56 against 0.11-0.13 ms for 64 x 4096 fp32, one
    thread; 11% of an EDM block's dual GroupNorm backward). ``scratch`` None (under vmap, which has no
    ``out=`` rule): a temporary product."""
    a2, b2 = a.reshape(rows, -1), b.reshape(rows, -1)
    prod = torch.mul(a2, b2) if scratch is None else torch.mul(a2, b2, out=scratch.view(rows, -1))
    return prod.sum(1).view(rows, 1, 1)


class GroupNormDual(torch.autograd.Function):
    """``(x, x_dot, w, b) -> (group_norm(x), its JVP along x_dot)``; see module doc."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_dot, weight, bias, num_groups, eps):
        return _native_forward(x, x_dot, weight, bias, num_groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_dot, weight, bias, num_groups, eps = inputs
        ctx.save_for_backward(x, x_dot, weight)
        ctx.num_groups, ctx.eps = num_groups, eps
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable  # the kernels' backward has no derivative in PyTorch: a double backward raises
    def backward(ctx, g, g_dot):
        return _native_backward(ctx, g, g_dot)


def _normalized(x, x_dot, num_groups, eps):
    """``(xh, dh, mean, rstd)``: x normalised without the affine (module doc's xh), its tangent J x_dot, and the
    per-(sample, group) statistics, in the accumulation dtype (one ``native_group_norm``, one kernel backward)."""
    acc = _acc_dtype(x.dtype)
    xa, da = x.to(acc).contiguous(), x_dot.to(acc).contiguous()
    n, c, hw = _sizes(xa)
    xh, mean, rstd = _aten.native_group_norm(xa, None, None, n, c, hw, num_groups, eps)
    dh = _aten.native_group_norm_backward(da, xa, mean, rstd, None, n, c, hw, num_groups, [True, False, False])[0]
    return xh, dh, mean, rstd


def _native_backward(ctx, g, g_dot, normalized=None):
    """Backward from the group-norm kernels (module doc, "Kernels"); first order only. ``normalized``: the
    :func:`_normalized` of the saved x, x_dot where the caller has them (not computed again here)."""
    x, x_dot, weight = ctx.saved_tensors
    ng = ctx.num_groups
    acc = _acc_dtype(x.dtype)
    xa, da = x.to(acc).contiguous(), x_dot.to(acc).contiguous()
    w = _up(weight, acc)
    n, c, hw = _sizes(xa)
    need_x, need_xd, need_w, need_b = ctx.needs_input_grad[:4]
    need_w, need_b = need_w and weight is not None, need_b and ctx.has_bias
    if normalized is None:
        xh, mean, rstd = _aten.native_group_norm(xa, None, None, n, c, hw, ng, ctx.eps)
        t_given = None
    else:
        xh, t_given, mean, rstd = normalized
    lead = (0,) + tuple(range(2, xa.dim()))
    dx = dxd = dw = db = None
    if g is not None and (need_x or need_w or need_b):
        ga = g.to(acc).contiguous()
        # The kernel's dbeta needs gamma (it reads it for shape and dtype only).
        fused_b = need_b and w is not None
        if need_x or need_w or fused_b:
            dx, dw, db = _aten.native_group_norm_backward(ga, xa, mean, rstd, w, n, c, hw, ng,
                                                          [need_x, need_w, fused_b])
        if need_b and not fused_b:
            db = ga.sum(lead)
    if g_dot is not None and (need_x or need_xd or need_w):
        gda = g_dot.to(acc).contiguous()
        u = t = None
        if need_x or need_xd:  # J (w Gd)
            u = _aten.native_group_norm_backward(gda, xa, mean, rstd, w, n, c, hw, ng, [True, False, False])[0]
        if (need_x or need_w) and t_given is not None:
            t = t_given
        elif need_x or need_w:  # x̂_dot = J x_dot
            t = _aten.native_group_norm_backward(da, xa, mean, rstd, None, n, c, hw, ng, [True, False, False])[0]
        # Freed before dx's accumulator is made: no more held at once than before.
        scratch = torch.empty_like(xh) if (need_w or need_x) and not torch._C._are_functorch_transforms_active() \
            else None
        if need_w:
            gw = _group_dot(gda, t, n * c, scratch).reshape(n, c).sum(0)
            dw = gw if dw is None else dw + gw
        if need_x:
            rows = n * ng
            h = gda if w is None else gda * _per_channel(w, gda)
            k = rstd.reshape(rows, 1, 1) * (-1.0 / (c // ng * hw))
            bb = _group_dot(xh, da, rows, scratch) * k
            cc = _group_dot(h, xh, rows, scratch) * k
            dd = _group_dot(h, t, rows, scratch) * k
            del h, scratch
            acc_x = torch.mul(xh.reshape(rows, -1), dd.reshape(rows, 1))
            acc_x.addcmul_(t.reshape(rows, -1), cc.reshape(rows, 1)).addcmul_(u.reshape(rows, -1), bb.reshape(rows, 1))
            dx = acc_x.reshape(xa.shape) if dx is None else dx.add_(acc_x.reshape(xa.shape))
        if need_xd:
            dxd = u
    dx = None if dx is None else dx.reshape(x.shape).to(x.dtype)
    dxd = None if dxd is None else dxd.reshape(x.shape).to(x.dtype)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(ctx.bias_dtype)
    return dx, dxd, dw, db, None, None
