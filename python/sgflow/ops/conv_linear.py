r"""Dual convolution and linear layer: primal and tangent as two calls sharing one weight.

Shapes: conv ``x, x_dot: [B, C_in, *spatial]`` (1 to 3 spatial dims), ``W: [C_out, C_in / groups,
*kernel]`` (``[C_in, C_out / groups, *kernel]`` transposed), ``b: [C_out]`` or None; linear
``x, x_dot: [*, in]``, ``W: [out, in]``, ``b: [out]`` or None. ``y, y_dot`` have the primal op's shape.

Forward
-------
    y = conv(x, W) + b,        y_dot = conv(x_dot, W)          (DualConv, aten.convolution)
    y = x W^T + b,             y_dot = x_dot W^T               (DualLinear)

Backward
--------
Cotangents ``G``, ``Gd`` (either may be None); the operator is linear in x, so there is no
second-order term:

    dx = conv^T(G, W),         dx_dot = conv^T(Gd, W),        dW = dW(G, x) + dW(Gd, x_dot)
                               (aten.convolution_backward per stream; dW(G, x): its weight gradient)
    dx = G W,                  dx_dot = Gd W,                 dW = G^T x + Gd^T x_dot
    db = sum of G over every dim but the channel / feature dim

``dW`` is two products accumulated (no stacked copy of either stream); in half precision one product
over the stacked rows ``[x; x_dot]``, so that it is rounded once.

Saved: x, x_dot and W (x and x_dot are usually alive anyway as the previous op's outputs).

Elementwise -> linear / conv (``PointwiseLinearDual``: a transformer MLP's GELU -> fc2;
``PointwiseConvDual``: a U-Net block's SiLU -> conv where no GroupNorm fusion takes it)
----------------------------------------------------------------------------------------------------
``(a, a_dot) = (f(x), f'(x) x_dot)`` (:mod:`sgflow.ops.pointwise`) feeding the layer above:

    y = a W^T + b,     y_dot = a_dot W^T            (conv: y = conv(a, W) + b, y_dot = conv(a_dot, W))
    dW = G^T a + Gd^T a_dot,   (da, da_dot) = (G W, Gd W),   (dx, dx_dot) = the elementwise dual's backward

Saved: x, x_dot and W only; (a, a_dot) recomputed in backward (one pass of the elementwise dual). The two
ops apart keep both (x, x_dot) and (a, a_dot): on a DiT block 16 of its 84 MiB.

Module layout (see docs/DESIGN.md): :class:`DualConv`, :class:`DualLinear` (applied by the dual engine's
conv and linear rules, sgflow.autodual.rules.conv_linear, which cast for autocast); no kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sgflow.ops.pointwise import pointwise_dual_grads, pointwise_dual_grads_into, pointwise_dual_values
from sgflow.ops.recompute import unused_outputs

__all__ = ["DualConv", "DualLinear", "PointwiseLinearDual", "PointwiseConvDual"]


class DualConv(torch.autograd.Function):
    r"""``(x, x_dot, W, b) -> (conv(x, W) + b, conv(x_dot, W))``: two convolutions sharing W.

    Saves x and x_dot (usually alive anyway as the previous op's outputs). Not one convolution over the
    stacked ``[x; x_dot]``: the stacked input copy (and, in backward, the stacked cotangents and inputs)
    are extra activation-sized buffers at a recomputed block's peak, and two calls measured 5-10% faster
    on CPU (benchmarks/NOTES.md). Backward: one ``convolution_backward`` per stream, ``dW`` summed; in
    half precision one call over the stacked rows, so that ``dW`` is rounded once. ``conf``: (stride,
    padding, dilation, transposed, output_padding, groups), normalised to lists.
    """

    @staticmethod
    def forward(ctx, x, x_dot, weight, bias, conf):
        ctx.conf = conf
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, x_dot, weight)
        ctx.set_materialize_grads(False)
        unused = unused_outputs()  # a recomputed block's dead tail (sgflow.ops.recompute.outputs_unused)
        if unused is not None:
            return unused
        return (torch.ops.aten.convolution(x, weight, bias, *conf),
                torch.ops.aten.convolution(x_dot, weight, None, *conf))

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad[:4]
        n = x.shape[0]
        gx = gxd = gw = None
        if g is not None and g_dot is not None and x.dtype in (torch.float16, torch.bfloat16):
            gin, gw, _ = torch.ops.aten.convolution_backward(
                torch.cat([g, g_dot]), torch.cat([x, x_dot]), weight, None, *ctx.conf, [need_x or need_xd, need_w, False])
            gx, gxd = (None, None) if gin is None else gin.split(n)
        else:
            (gx, gxd), gw = _conv_grads(((g, x, need_x), (g_dot, x_dot, need_xd)), weight, ctx.conf, need_w)
        gb = None
        if ctx.has_bias and need_b and g is not None:
            gb = g.sum([0] + list(range(2, g.dim())))
        return gx, gxd, gw, gb, None


def _conv_grads(streams, weight, conf, need_w):
    """``([dx per stream], dW)`` of a convolution applied to each stream ``(cotangent, input, need_input)``: one
    ``convolution_backward`` per stream (a None cotangent skipped: None), the weight gradients summed in place."""
    gw = None
    grads_in = []
    for grad, inp, need_in in streams:
        gin = None
        if grad is not None:
            gin, gw_part, _ = torch.ops.aten.convolution_backward(grad, inp, weight, None, *conf, [need_in, need_w, False])
            if gw_part is not None:
                gw = gw_part if gw is None else gw.add_(gw_part)
        grads_in.append(gin)
    return grads_in, gw


def _rows(t):
    """``t`` as a [rows, features] matrix (a view where the layout allows, as F.linear's reshape)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _unrows(t, shape):
    return t if t.shape == shape else t.view(shape)


class DualLinear(torch.autograd.Function):
    """``(x, x_dot, W, b) -> (x W^T + b, x_dot W^T)`` as two products sharing W; saves x and x_dot.
    Not one product over the stacked rows ``[x; x_dot]``: the stacked copy of the input is an extra
    activation-sized buffer at the recomputed block's peak (16 MiB of the token-attention MLP's 138), and
    keeps the primal half of the output alive as long as the tangent half; two calls measured 10-20%
    faster on CPU too (benchmarks/NOTES.md). Backward: ``dx = g W``, ``dx_dot = g_dot W`` and ``dW = g^T x +
    g_dot^T x_dot`` (one product over the stacked rows in half precision: rounded once)."""

    @staticmethod
    def forward(ctx, x, x_dot, weight, bias):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, x_dot, weight)
        ctx.set_materialize_grads(False)
        unused = unused_outputs()
        if unused is not None:
            return unused
        if x.dim() < 2 or x_dot.shape != x.shape:
            return F.linear(x, weight, bias), F.linear(x_dot, weight)
        # F.linear's own decomposition with one transposed weight for both streams (F.linear makes its
        # own per call): rows as a matrix, addmm / mm, back to the leading shape.
        wt = weight.t()
        out_shape = (*x.shape[:-1], weight.shape[0])
        x2, xd2 = _rows(x), _rows(x_dot)
        y = torch.addmm(bias, x2, wt) if bias is not None else torch.mm(x2, wt)
        return _unrows(y, out_shape), _unrows(torch.mm(xd2, wt), out_shape)

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad
        if g is None and g_dot is None:
            return None, None, None, None
        dout, din = weight.shape
        gx = gxd = gw = gb = None
        low = x.dtype in (torch.float16, torch.bfloat16)
        # Every stream as a [rows, features] matrix once (per product, the reshapes and transposes were
        # half of the backward's ops).
        g2 = None if g is None else _rows(g)
        gd2 = None if g_dot is None else _rows(g_dot)
        if need_x and g is not None:
            gx = _unrows(g2 @ weight, x.shape)
        if need_xd and g_dot is not None:
            gxd = _unrows(gd2 @ weight, x_dot.shape)
        if need_w:
            if g is not None and g_dot is not None and low:
                # One product over the stacked rows: dW rounded once to half precision.
                gw = torch.cat([g2, gd2]).t() @ torch.cat([_rows(x), _rows(x_dot)])
            else:
                # fp32/fp64: two products accumulated in place, without the stacked copies (memory at
                # the backward peak of a recomputed block).
                for gg, xx in ((g2, x), (gd2, x_dot)):
                    if gg is None:
                        continue
                    term_a, term_b = gg.t(), _rows(xx)
                    gw = term_a @ term_b if gw is None else gw.addmm_(term_a, term_b)
        if ctx.has_bias and need_b and g is not None:
            gb = g2.sum(0)
        return gx, gxd, gw, gb


def _activation_grads(ctx, x, x_dot, da, dad, need_x, need_xd):
    """The elementwise dual's ``(dx, dx_dot)`` from the gradients ``da``, ``dad`` of its outputs: written over
    them where the C++ kernel applies (two activation-sized buffers at the fused op's peak, not four)."""
    if pointwise_dual_grads_into(x, x_dot, da, dad, ctx.spec, ctx.extra):
        return (da if need_x else None), (dad if need_xd else None)
    return pointwise_dual_grads(x, x_dot, da, dad, ctx.spec, ctx.extra, need_x, need_xd)


class PointwiseLinearDual(torch.autograd.Function):
    r"""``(x, x_dot, W, b, spec, extra) -> (f(x) W^T + b, (f'(x) x_dot) W^T)``: an elementwise dual (``spec``,
    ``extra`` as in :class:`sgflow.ops.pointwise.PointwiseDual`) feeding a linear layer, saving x, x_dot and W
    (module doc). x, x_dot: [*, in] (at least 2-D); W: [out, in]; b: [out] or None; outputs [*, out].
    Once differentiable, as :class:`sgflow.ops.pointwise.PointwiseDual`."""

    @staticmethod
    def forward(ctx, x, x_dot, weight, bias, spec, extra):
        ctx.spec, ctx.extra, ctx.has_bias = spec, extra, bias is not None
        ctx.save_for_backward(x, x_dot, weight)
        ctx.set_materialize_grads(False)
        unused = unused_outputs()
        if unused is not None:
            return unused
        a, a_dot = pointwise_dual_values(x, x_dot, spec, extra)
        wt = weight.t()
        out_shape = (*x.shape[:-1], weight.shape[0])
        a2 = _rows(a)
        y = torch.addmm(bias, a2, wt) if bias is not None else torch.mm(a2, wt)
        del a, a2
        return _unrows(y, out_shape), _unrows(torch.mm(_rows(a_dot), wt), out_shape)

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad[:4]
        if g is None and g_dot is None:
            return (None,) * 6
        g2 = None if g is None else _rows(g)
        gd2 = None if g_dot is None else _rows(g_dot)
        gw = gb = dx = dxd = None
        if need_w:
            a, a_dot = pointwise_dual_values(x, x_dot, ctx.spec, ctx.extra)
            low = x.dtype in (torch.float16, torch.bfloat16)
            if g2 is not None and gd2 is not None and low:  # rounded once, as DualLinear
                gw = torch.cat([g2, gd2]).t() @ torch.cat([_rows(a), _rows(a_dot)])
            else:
                for gg, aa in ((g2, a), (gd2, a_dot)):
                    if gg is not None:
                        gw = gg.t() @ _rows(aa) if gw is None else gw.addmm_(gg.t(), _rows(aa))
            del a, a_dot
        if ctx.has_bias and need_b and g2 is not None:
            gb = g2.sum(0)
        if need_x or need_xd:
            da = None if g2 is None else _unrows(g2 @ weight, x.shape)
            dad = None if gd2 is None else _unrows(gd2 @ weight, x.shape)
            dx, dxd = _activation_grads(ctx, x, x_dot, da, dad, need_x, need_xd)
        return dx, dxd, gw, gb, None, None


class PointwiseConvDual(torch.autograd.Function):
    r"""``(x, x_dot, W, b, conf, spec, extra) -> (conv(f(x), W) + b, conv(f'(x) x_dot, W))``: an elementwise
    dual feeding a convolution (``conf`` as in :class:`DualConv`), saving x, x_dot and W (module doc).
    x, x_dot: [B, C_in, *spatial]; outputs those of the convolution. Once differentiable."""

    @staticmethod
    def forward(ctx, x, x_dot, weight, bias, conf, spec, extra):
        ctx.conf, ctx.spec, ctx.extra, ctx.has_bias = conf, spec, extra, bias is not None
        ctx.save_for_backward(x, x_dot, weight)
        ctx.set_materialize_grads(False)
        unused = unused_outputs()
        if unused is not None:
            return unused
        a, a_dot = pointwise_dual_values(x, x_dot, spec, extra)
        y = torch.ops.aten.convolution(a, weight, bias, *conf)
        del a
        return y, torch.ops.aten.convolution(a_dot, weight, None, *conf)

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad[:4]
        if g is None and g_dot is None:
            return (None,) * 7
        a, a_dot = pointwise_dual_values(x, x_dot, ctx.spec, ctx.extra)
        need_in = need_x or need_xd
        grads_in, gw = _conv_grads(((g, a, need_in), (g_dot, a_dot, need_in)), weight, ctx.conf, need_w)
        del a, a_dot
        dx = dxd = None
        if need_in:
            dx, dxd = _activation_grads(ctx, x, x_dot, *grads_in, need_x, need_xd)
        gb = g.sum([0] + list(range(2, g.dim()))) if ctx.has_bias and need_b and g is not None else None
        return dx, dxd, gw, gb, None, None, None
