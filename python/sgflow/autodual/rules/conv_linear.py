r"""Conv and linear: primal and tangent as two calls on one weight (``DualConv``, ``DualLinear`` of
:mod:`sgflow.ops.conv_linear`); a weight computed from the inputs takes the product rule."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sgflow.autodual.rules.common import _bind, _fit, _nullctx
from sgflow.autodual.rules.fusions import _gn_modulate_conv, _gn_silu_conv, _pointwise_conv, _pointwise_linear
from sgflow.autodual.tails import tail_op
from sgflow.autodual.tensor import DualTensor, make_dual, primal, wrap_outputs
from sgflow.ops.conv_linear import DualConv, DualLinear


# ---------------------------------------------------------------------------------------------
# Conv / linear: primal and tangent as two calls on one weight


_CONV_NDIM = {}
for _n, _d in (("conv1d", 1), ("conv2d", 2), ("conv3d", 3), ("conv_transpose1d", 1), ("conv_transpose2d", 2), ("conv_transpose3d", 3)):
    _f = getattr(torch, _n, None) or getattr(F, _n)
    _CONV_NDIM[_f] = _d
    _CONV_NDIM[getattr(F, _n)] = _d


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
        if conf is not None:
            fused = _pointwise_conv(x, w, bias, conf)
            if fused is None:
                fused = _gn_modulate_conv(x, w, bias, conf)
            if fused is not None:
                return fused
        if conf is not None and x._primal.dim() == _CONV_NDIM[func] + 2:
            xp = x._primal
            (xp, xt, w, bias), autocast = _autocast_args(xp.device.type, xp, x._tangent.to(xp.dtype), w, bias)
            with torch.autocast(xp.device.type, enabled=False) if autocast else _nullctx():
                return make_dual(*tail_op(lambda: DualConv.apply(xp, xt, w, bias, conf)))
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
    fused = _pointwise_linear(x, w, bias)
    if fused is not None:
        return fused
    if isinstance(x, DualTensor) and not isinstance(w, DualTensor) and not isinstance(bias, DualTensor) and x._primal.dim() >= 2:
        xp = x._primal
        (xp, xt, w, bias), autocast = _autocast_args(xp.device.type, xp, x._tangent.to(xp.dtype), w, bias)
        with torch.autocast(xp.device.type, enabled=False) if autocast else _nullctx():
            return make_dual(*tail_op(lambda: DualLinear.apply(xp, xt, w, bias)))
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
