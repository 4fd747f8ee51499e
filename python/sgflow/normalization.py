"""Normalisation statistics and the normalised input's tangent, written once for every dual path.

Used by the dual engine's norm rules (``autodual/rules/norms.py``), the dual GroupNorm op (``ops/groupnorm.py``)
and the decomposed norms of the reference loss (``decompose.py``). The fused GroupNorm-SiLU op's reference
(``ops/groupnorm_silu.groupnorm_silu_dual_ref``) keeps its own explicit formulas on purpose: it is what the
kernels and these functions are checked against.

For x normalised over ``dims`` (mean mu, biased variance var, r = 1 / sqrt(var + eps)):

    x̂ = (x - mu) r,    x̂_dot = r (x_dot - mean(x_dot) - x̂ mean(x̂ x_dot))

and for the RMS norm (no centring), r = 1 / sqrt(mean(x²) + eps), x̂ = x r, x̂_dot = r (x_dot - x̂ mean(x̂ x_dot)).
Plain means and elementwise ops only: every order of derivative goes through ordinary autograd rules.
"""
from __future__ import annotations

import math

import torch


def moments(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, centred input and biased variance of ``x`` over ``dims`` (kept as size-1 dims).

    Two plain means rather than a fused variance kernel: only elementwise and reduction rules enter the
    derivatives of every order."""
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    return mean, centred, centred.square().mean(dims, keepdim=True)


def normalize_dual(x: torch.Tensor, x_dot: torch.Tensor, dims, eps: float, rms: bool = False):
    """``(x̂, x̂_dot)``: ``x`` normalised over ``dims`` and its tangent along ``x_dot`` (module doc), in the
    inputs' dtype (callers upcast half precision first). x, x_dot: the same shape, any layout."""
    if rms:
        r = torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        xh = x * r
        return xh, r * (x_dot - xh * (xh * x_dot).mean(dims, keepdim=True))
    _, centred, var = moments(x, dims)
    r = torch.rsqrt(var + eps)
    xh = centred * r
    return xh, r * (x_dot - x_dot.mean(dims, keepdim=True) - xh * (xh * x_dot).mean(dims, keepdim=True))


_aten = torch.ops.aten


class LayerNormDual(torch.autograd.Function):
    r"""Dual layer norm with plain (or no) affine parameters, from PyTorch's own layer-norm kernels:
    ``(x, x_dot, w, b) -> (y, y_dot)``, ``y = x̂ w + b``, ``y_dot = w x̂_dot``, normalised over the last
    ``len(normalized_shape)`` dims (n elements per row; mean mu, r = rstd).

    The normalisation's Jacobian ``J = r (I - 11ᵀ/n - x̂ x̂ᵀ/n)`` is symmetric, so ``x̂_dot = J x_dot`` is
    ``native_layer_norm_backward`` applied to x_dot (one op, no temporaries). Backward with cotangents
    ``G``, ``Gd`` (``H = Gd w``, per-row sums ``B = <x̂, x_dot>``, ``C = <H, x̂>``, ``D = <H, x̂_dot>``):

        dx_dot = J H                                         (native_layer_norm_backward)
        dx     = J (G w) - (r/n) (D x̂ + C x̂_dot + B dx_dot)   (the last term: d<H, J x_dot>/dx)
        dw     = sum_rows(G x̂ + Gd x̂_dot),    db = sum_rows(G)

    Saved: x, x_dot and w; x̂ with the statistics and x̂_dot recomputed in backward (one op each; keeping
    the [rows, 1] statistics instead raised a recomputed DiT block's peak by their 64 KiB). The backward
    is built from differentiable ops (double backward through autograd).
    Callers upcast half precision and disable autocast (sgflow.autodual.rules.norms).
    """

    @staticmethod
    def forward(ctx, x, x_dot, weight, bias, normalized_shape, eps):
        ns = list(normalized_shape)
        # Each kernel call makes its own dense copy of a strided input (a DiT's residual stream keeps the
        # patch embedding's transposed layout: 114 ms of copies in a DiT step): one copy here, shared.
        xc, xdc = x.contiguous(), x_dot.contiguous()
        y, mean, rstd = _aten.native_layer_norm(xc, ns, weight, bias, eps)
        t = _aten.native_layer_norm_backward(xdc, xc, ns, mean, rstd, None, None, [True, False, False])[0]
        if weight is not None:
            t = t.mul_(weight)
        ctx.ns, ctx.eps, ctx.has_w, ctx.has_b = ns, eps, weight is not None, bias is not None
        ctx.save_for_backward(x, x_dot, weight)
        ctx.set_materialize_grads(False)
        return y, t

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, w = ctx.saved_tensors
        x, x_dot = x.contiguous(), x_dot.contiguous()  # once for the four kernel calls below (saved as given)
        ns = ctx.ns
        # x̂ and the statistics again, one op (saving [rows, 1] statistics raised a recomputed block's peak).
        xh, mean, rstd = _aten.native_layer_norm(x, ns, None, None, ctx.eps)
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad[:4]
        need_w, need_b = need_w and ctx.has_w, need_b and ctx.has_b
        red = tuple(range(x.dim() - len(ns), x.dim()))
        lead = tuple(range(x.dim() - len(ns)))
        dx = dxd = dw = db = None
        # The tangent's terms first and dx last, each row-sized temporary freed as soon as its row sums are
        # taken: at most x̂, t, u and dx live besides the cotangents (it was x̂, t, u, dx, H and a product:
        # 24 MiB on a 4096 x 256 float32 layer norm, the peak of a token-attention MLP's step).
        if g_dot is not None and (need_x or need_xd or need_w):
            t = _aten.native_layer_norm_backward(x_dot, x, ns, mean, rstd, None, None, [True, False, False])[0] \
                if need_x or need_w else None
            if need_w:
                dw = (g_dot * t).sum(lead) if lead else g_dot * t
            if need_x:
                r = rstd
                if torch.is_grad_enabled():  # double backward: x̂ and r as functions of x
                    var, m = torch.var_mean(x, red, correction=0, keepdim=True)
                    r = torch.rsqrt(var + ctx.eps)
                    xh = (x - m) * r
                h = g_dot if w is None else g_dot * w
                k = r * (-1.0 / math.prod(ns))
                bb = (xh * x_dot).sum(red, keepdim=True) * k
                cc = (h * xh).sum(red, keepdim=True) * k
                dd = (h * t).sum(red, keepdim=True) * k
                del h
            u = _aten.native_layer_norm_backward(g_dot, x, ns, mean, rstd, w, None, [True, False, False])[0] \
                if need_x or need_xd else None
        if g is not None and (need_x or need_w or need_b):
            # The kernel reads bias only for its shape and dtype (those of w: the bias is not saved).
            fused_b = need_b and w is not None
            dx, dw_g, db = _aten.native_layer_norm_backward(g, x, ns, mean, rstd, w, w if fused_b else None,
                                                            [need_x, need_w, fused_b])
            if dw_g is not None:
                dw = dw_g if dw is None else dw_g + dw
            if need_b and not fused_b:
                db = g.sum(lead) if lead else g
        if g_dot is not None and need_x:
            if torch.is_grad_enabled():
                second = xh * dd + t * cc + u * bb
                dx = second if dx is None else dx + second
            else:
                dx = torch.mul(xh, dd) if dx is None else dx.addcmul_(xh, dd)
                dx.addcmul_(t, cc).addcmul_(u, bb)
        if g_dot is not None and need_xd:
            dxd = u
        return dx, dxd, dw, db, None, None
