r"""Conv and linear: primal and tangent as two calls on one weight (``_DualConv``, ``_DualLinear``);
a weight computed from the inputs takes the product rule."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sgflow.autodual.rules.common import _bind, _fit, _nullctx
from sgflow.autodual.rules.fusions import _gn_silu_conv
from sgflow.autodual.tensor import DualTensor, make_dual, primal, wrap_outputs


# ---------------------------------------------------------------------------------------------
# Conv / linear: primal and tangent as two calls on one weight


_CONV_NDIM = {}
for _n, _d in (("conv1d", 1), ("conv2d", 2), ("conv3d", 3), ("conv_transpose1d", 1), ("conv_transpose2d", 2), ("conv_transpose3d", 3)):
    _f = getattr(torch, _n, None) or getattr(F, _n)
    _CONV_NDIM[_f] = _d
    _CONV_NDIM[getattr(F, _n)] = _d


class _DualConv(torch.autograd.Function):
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
            grads_in = []
            for grad, inp, need_in in ((g, x, need_x), (g_dot, x_dot, need_xd)):
                gin = None
                if grad is not None:
                    gin, gw_part, _ = torch.ops.aten.convolution_backward(
                        grad, inp, weight, None, *ctx.conf, [need_in, need_w, False])
                    if gw_part is not None:
                        gw = gw_part if gw is None else gw.add_(gw_part)
                grads_in.append(gin)
            gx, gxd = grads_in
        gb = None
        if ctx.has_bias and need_b and g is not None:
            gb = g.sum([0] + list(range(2, g.dim())))
        return gx, gxd, gw, gb, None


class _DualLinear(torch.autograd.Function):
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
        return F.linear(x, weight, bias), F.linear(x_dot, weight)

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad
        if g is None and g_dot is None:
            return None, None, None, None
        n = x.shape[0]
        dout, din = weight.shape
        gx = gxd = gw = gb = None
        low = x.dtype in (torch.float16, torch.bfloat16)
        if need_x and g is not None:
            gx = g @ weight
        if need_xd and g_dot is not None:
            gxd = g_dot @ weight
        if need_w:
            if g is not None and g_dot is not None and low:
                # One product over the stacked rows: dW rounded once to half precision.
                gw = torch.cat([g, g_dot]).reshape(-1, dout).t() @ torch.cat([x, x_dot]).reshape(-1, din)
            else:
                # fp32/fp64: two products accumulated in place, without the stacked copies (memory at
                # the backward peak of a recomputed block).
                for gg, xx in ((g, x), (g_dot, x_dot)):
                    if gg is None:
                        continue
                    term_a, term_b = gg.reshape(-1, dout).t(), xx.reshape(-1, din)
                    gw = term_a @ term_b if gw is None else gw.addmm_(term_a, term_b)
        if ctx.has_bias and need_b and g is not None:
            gb = g.reshape(-1, dout).sum(0)
        return gx, gxd, gw, gb


def _autocast_args(device_type, *tensors):
    """Autocast semantics for the stacked conv/linear: cast to the autocast dtype, run with it off."""
    if not torch.is_autocast_enabled(device_type):
        return tensors, False
    dt = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dt) for t in tensors), True


def _ntuple(v, n):
    return list(v) if isinstance(v, (tuple, list)) else [v] * n


def _conv_conf(func, w, rest, kw):
    """(stride, padding, dilation, transposed, output_padding, groups) for aten.convolution, or None
    where the call uses string padding that is not symmetric ('same' with an even kernel)."""
    nd = _CONV_NDIM[func]
    transposed = "transpose" in func.__name__
    names = ("stride", "padding", "output_padding", "groups", "dilation") if transposed else ("stride", "padding", "dilation", "groups")
    b = _bind(rest, kw, names, {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0})
    stride, dilation = _ntuple(b["stride"], nd), _ntuple(b["dilation"], nd)
    pad = b["padding"]
    if isinstance(pad, str):
        if pad == "valid":
            pad = 0
        else:  # 'same' (stride 1): total padding d (k - 1) per dim, symmetric only when even
            total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
            if any(t % 2 for t in total):
                return None
            pad = [t // 2 for t in total]
    return (stride, _ntuple(pad, nd), dilation, transposed, _ntuple(b["output_padding"], nd), int(b["groups"]))


def _conv_rule(func, args, kwargs):
    names = ("input", "weight", "bias")
    x = args[0] if args else kwargs["input"]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    rest = list(args[3:])
    kw = {k: v for k, v in kwargs.items() if k not in names}
    if isinstance(x, DualTensor) and not isinstance(w, DualTensor) and not isinstance(bias, DualTensor):
        conf = _conv_conf(func, w, rest, kw)
        if conf is not None and _CONV_NDIM[func] == 2:
            fused = _gn_silu_conv(x, w, bias, conf)
            if fused is not None:
                return fused
        if conf is not None and x._primal.dim() == _CONV_NDIM[func] + 2:
            xp = x._primal
            (xp, xt, w, bias), autocast = _autocast_args(xp.device.type, xp, x._tangent.to(xp.dtype), w, bias)
            with torch.autocast(xp.device.type, enabled=False) if autocast else _nullctx():
                return make_dual(*_DualConv.apply(xp, xt, w, bias, conf))
    # A weight or bias computed from the inputs (hypernetworks): product rule over (x, w), bias tangent added.
    out = func(primal(x), primal(w), primal(bias), *rest, **kw)
    t = None
    if isinstance(x, DualTensor):
        t = func(x._tangent, primal(w), None, *rest, **kw)
    if isinstance(w, DualTensor):
        term = func(primal(x), w._tangent, None, *rest, **kw)
        t = term if t is None else t + term
    if isinstance(bias, DualTensor):
        term = bias._tangent.reshape(-1, *([1] * _CONV_NDIM[func]))
        t = term.expand(out.shape) if t is None else t + term
    return wrap_outputs(out, _fit(t, out.shape))


def _linear_rule(func, args, kwargs):
    b = _bind(args, kwargs, ("input", "weight", "bias"), {"bias": None})
    x, w, bias = b["input"], b["weight"], b["bias"]
    if isinstance(x, DualTensor) and not isinstance(w, DualTensor) and not isinstance(bias, DualTensor) and x._primal.dim() >= 2:
        xp = x._primal
        (xp, xt, w, bias), autocast = _autocast_args(xp.device.type, xp, x._tangent.to(xp.dtype), w, bias)
        with torch.autocast(xp.device.type, enabled=False) if autocast else _nullctx():
            return make_dual(*_DualLinear.apply(xp, xt, w, bias))
    out = func(primal(x), primal(w), primal(bias))
    t = None
    if isinstance(x, DualTensor):
        t = func(x._tangent, primal(w))
    if isinstance(w, DualTensor):
        term = func(primal(x), w._tangent)
        t = term if t is None else t + term
    if isinstance(bias, DualTensor):
        t = bias._tangent.expand(out.shape) if t is None else t + bias._tangent
    return wrap_outputs(out, _fit(t, out.shape))
