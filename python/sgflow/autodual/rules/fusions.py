r"""Dropout (one mask for primal and tangent) and the fusions of lazy nodes: silu(group_norm) as the fused
GroupNorm+SiLU op, kept lazy through a dropout (``F.dropout`` or ``sgflow.ops.apply_dropout_mask``) so that
a following conv runs the fused GroupNorm -> SiLU -> (Dropout) -> Conv2d stage; GELU / SiLU of a computed
dual tensor as a lazy node that a following linear layer or convolution takes as the fused elementwise ->
linear / conv op (saving the activation's input only). The dropout rules and the fusions call each other,
hence one module."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sgflow.autodual.rules.common import _bind
from sgflow.autodual.rules.structural import inplace_error
from sgflow.autodual.tails import tail_op
from sgflow.autodual.tensor import DualTensor, fail, make_dual, note_rule


def _dropout_rule(func, args, kwargs):
    """One Bernoulli mask for primal and tangent (the recomputation replays it: RNG state restored)."""
    b = _bind(args, kwargs, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
    x, p, training = b["input"], float(b["p"]), b["training"]
    if b["inplace"]:
        return inplace_error(func, args, kwargs)
    if not training or p == 0.0:
        return x
    from sgflow.autodual.attention import LazyDual

    if (func is F.dropout and 0.0 < p < 1.0 and isinstance(x, LazyDual) and x._cache is None
            and x._kind == "gn_silu" and x._parts["p"] == 0.0):
        return _gn_silu_dropout(x, p)
    xp = x._primal
    if p >= 1.0:
        return make_dual(torch.zeros_like(xp), torch.zeros_like(x._tangent))
    if func is F.dropout or func is torch.dropout:
        shape = xp.shape
    else:  # dropout1d/2d/3d: one draw per (sample, channel)
        nsp = {F.dropout1d: 1, F.dropout2d: 2, F.dropout3d: 3}[func]
        batched = xp.dim() == nsp + 2
        shape = (xp.shape[: 2] if batched else xp.shape[:1]) + (1,) * nsp
    mask = torch.empty(shape, dtype=xp.dtype, device=xp.device).bernoulli_(1.0 - p).div_(1.0 - p)
    return make_dual(xp * mask, x._tangent * mask)


def _gn_silu(x):
    """silu(group_norm(...)) of a lazy GroupNorm node: a lazy GroupNorm+SiLU node (a conv that follows
    takes the fused GroupNorm -> SiLU -> conv stage; any other use runs the fused GroupNorm+SiLU op);
    None for any other input."""
    from sgflow.autodual.attention import LazyDual

    if not (isinstance(x, LazyDual) and x._cache is None and x._kind == "gn"):
        return None
    parts = dict(x._parts, p=0.0)
    note_rule("rule:group_norm+silu (fused op)")
    return LazyDual(x._lazy_shape, x._like, "gn_silu", parts, lambda: _gn_silu_eager(parts))


def _gn_silu_eager(parts):
    from sgflow.ops.groupnorm_silu import groupnorm_silu_dual

    src = parts["x"]
    y, yd = groupnorm_silu_dual(src._primal, src._tangent.to(src._primal.dtype), parts["w"], parts["b"], parts["g"],
                                float(parts["eps"]))
    return make_dual(y, yd)


def _gn_silu_dropout(x, p):
    """Dropout of a lazy GroupNorm+SiLU node, kept lazy so that a following conv fuses all four."""
    from sgflow.autodual.attention import LazyDual

    parts = dict(x._parts, p=p)
    mat = x._materialize

    def materialize():
        # Unfused: the GroupNorm+SiLU op, then this module's dropout rule (one mask for both streams).
        return _dropout_rule(F.dropout, (mat(), p, True), {})

    return LazyDual(x._lazy_shape, x._like, "gn_silu", parts, materialize)


def _dropout_mask_rule(func, args, kwargs):
    """sgflow.ops.apply_dropout_mask(h, mask, p): on a lazy GroupNorm+SiLU node it stays lazy, carrying the
    mask, so that a following conv runs the fused stage with it; otherwise a product with the constant
    multiplier mask / (1 - p) (the same mask for both streams)."""
    from sgflow.autodual.attention import LazyDual

    b = _bind(args, kwargs, ("h", "mask", "p"), {})
    h, mask, p = b["h"], b["mask"], float(b["p"])
    if isinstance(mask, DualTensor):
        raise fail(func, "the dropout mask must not depend on the dual inputs")
    if (isinstance(h, LazyDual) and h._cache is None and h._kind == "gn_silu" and h._parts["p"] == 0
            and mask.dtype == torch.bool and tuple(mask.shape) == tuple(h._lazy_shape) and 0.0 < p < 1.0):
        parts = dict(h._parts, p=p, mask=mask)
        mat = h._materialize

        def materialize():
            return _dropout_mask_rule(func, (mat(), mask, p), {})

        return LazyDual(h._lazy_shape, h._like, "gn_silu", parts, materialize)
    if not isinstance(h, DualTensor):
        return func(h, mask, p)
    hp = h._primal
    y = func(hp, mask, p)
    m = mask.to(hp.dtype) * (1.0 / (1.0 - p))
    return make_dual(y, h._tangent.to(hp.dtype) * m)


def _resample_factor(func, args, kwargs):
    """``(mode, s)`` where ``func(*args, **kwargs)`` resamples a 4-D input by an integer factor s >= 2 the way
    :class:`sgflow.ops.gn_silu_conv.GNSiLUConvDual` can: ``F.interpolate`` with an integral ``scale_factor``,
    mode nearest (``("nearest", s)``), or ``F.avg_pool2d`` over s x s blocks with stride s, no padding, H and W
    divisible by s (``("avg", s)``); else None."""
    from sgflow.autodual.attention import LazyDual

    if func is F.interpolate:
        b = _bind(args, kwargs, ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                                 "antialias"), {"size": None, "scale_factor": None, "mode": "nearest",
                                                "align_corners": None, "recompute_scale_factor": None, "antialias": False})
        sf = b["scale_factor"]
        if b["size"] is not None or sf is None or b["mode"] != "nearest" or b["antialias"]:
            return None
        sf = tuple(sf) if isinstance(sf, (tuple, list)) else (sf, sf)
        if len(sf) != 2 or sf[0] != sf[1] or isinstance(sf[0], bool) or float(sf[0]) != int(sf[0]) or int(sf[0]) < 2:
            return None
        return "nearest", int(sf[0])
    b = _bind(args, kwargs, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                             "divisor_override"), {"stride": None, "padding": 0, "ceil_mode": False,
                                                   "count_include_pad": True, "divisor_override": None})

    def pair(v):
        v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return v if len(v) == 2 and v[0] == v[1] and isinstance(v[0], int) and not isinstance(v[0], bool) else None

    k = pair(b["kernel_size"])
    stride = k if b["stride"] is None or (isinstance(b["stride"], (tuple, list)) and not b["stride"]) else pair(b["stride"])
    x = b["input"]
    h, w = (x._lazy_shape if isinstance(x, LazyDual) else x._primal.shape)[2:]
    if (k is None or stride != k or pair(b["padding"]) != (0, 0) or b["divisor_override"] is not None
            or k[0] < 2 or h % k[0] or w % k[0]):
        return None
    return "avg", k[0]


# Nearest upsampling / average pooling by an integer factor as dual ops (the fused GroupNorm -> SiLU -> resample ->
# conv stage, ResampleDual). Read at call time: False runs them as linear ops (F.interpolate / F.avg_pool2d on each
# stream).
RESAMPLE = True


def dual_resample(func, args, kwargs):
    """Nearest upsampling / average pooling by an integer factor of a 4-D dual tensor as one dual op
    (:class:`sgflow.ops.resample.ResampleDual`: strided copies and sums, a third of ``F.interpolate``'s /
    ``F.avg_pool2d``'s time on CPU, and nothing saved, where pooling's autograd keeps its input); None where it does
    not apply (other modes, sizes, half-precision pooling, whose sum rounds differently)."""
    from sgflow.ops.resample import ResampleDual

    x = args[0] if args else kwargs.get("input")
    if not RESAMPLE or not isinstance(x, DualTensor):
        return None
    xp = x._primal
    if xp.dim() != 4 or torch.is_autocast_enabled(xp.device.type):
        return None
    rs = _resample_factor(func, args, kwargs)
    if rs is None or (rs[0] == "avg" and xp.dtype not in (torch.float32, torch.float64)):
        return None
    return make_dual(*ResampleDual.apply(xp, x._tangent.to(xp.dtype), rs))


def resampled(func, args, kwargs):
    """F.interpolate / F.avg_pool2d of a dual tensor, computed: :func:`dual_resample` where it applies, else the
    linear rule (the op on each stream)."""
    from sgflow.autodual.rules.structural import linear

    out = dual_resample(func, args, kwargs)
    return linear(func, args, kwargs) if out is None else out


def gn_silu_resample(func, args, kwargs):
    """Nearest upsampling / average pooling (``func``: F.interpolate, F.avg_pool2d) of a lazy GroupNorm+SiLU node
    by an integer factor: a lazy node again (kind ``gn_silu_rs``), that a following conv runs as the fused stage with
    the resampling inside (the U-Net up / down blocks' ``conv(resample(silu(norm(x))))``: only the stage's input is
    saved, where apart the conv keeps the resampled activation pair, 4x the input's when upsampling); any other use
    computes it unfused. None where the pattern does not apply."""
    from sgflow.autodual.attention import LazyDual

    x = args[0] if args else kwargs.get("input")
    if not (RESAMPLE and isinstance(x, LazyDual) and x._cache is None and x._kind == "gn_silu" and len(x._lazy_shape) == 4):
        return None
    rs = _resample_factor(func, args, kwargs)
    if rs is None:
        return None
    mode, s = rs
    n, c, h, w = x._lazy_shape
    shape = (n, c, h * s, w * s) if mode == "nearest" else (n, c, h // s, w // s)
    rest = args[1:] if args else ()
    kw = {k: v for k, v in kwargs.items() if k != "input"}
    return LazyDual(shape, x._like, "gn_silu_rs", dict(x._parts, resample=rs),
                    lambda: resampled(func, (x, *rest), kw))


def _gn_silu_conv(x, w, bias, conf):
    """The GroupNorm -> SiLU -> (Dropout) -> (Resample) -> Conv2d stage as the fused dual op (saves only the
    stage input, its tangent and the group statistics), or None where the conv does not fit it."""
    from sgflow.autodual.attention import LazyDual

    if not (isinstance(x, LazyDual) and x._cache is None and x._kind in ("gn_silu", "gn_silu_rs")):
        return None
    stride, pad, dilation, transposed, _, groups = conf
    if transposed or groups != 1 or any(v != 1 for v in stride) or any(v != 1 for v in dilation) or w.dim() != 4:
        return None
    parts = x._parts
    src = parts["x"]
    xp = src._primal
    if xp.dim() != 4 or (w.dtype != xp.dtype and not torch.is_autocast_enabled(xp.device.type)):
        return None
    from sgflow.ops.groupnorm_silu import gn_silu_conv_dual

    y, yd = tail_op(lambda: gn_silu_conv_dual(
        xp, src._tangent.to(xp.dtype), parts["w"], parts["b"], parts["g"], w, bias, tuple(pad), eps=float(parts["eps"]),
        dropout_p=float(parts["p"]), training=parts["p"] > 0, dropout_mask=parts.get("mask"),
        resample=parts.get("resample")))
    note_rule("rule:group_norm+silu+resample+conv (fused stage op)" if parts.get("resample")
              else "rule:group_norm+silu+conv (fused stage op)")
    return make_dual(y, yd)


# Elementwise duals (their ``_SPECS`` names) that a following linear layer or convolution recomputes in its
# backward (cheap: one pass; GELU and SiLU, the MLP and U-Net activations, have C++ kernels on CPU). Read at
# call time: ``()`` turns the fusion off.
LAZY_POINTWISE = ("gelu", "silu")


def pointwise_lazy(xp, xt, spec, extra):
    """f(x) of a computed dual tensor ``(xp, xt)`` as a lazy node: a linear layer or convolution that follows
    runs the fused op (:class:`sgflow.ops.conv_linear.PointwiseLinearDual` / ``PointwiseConvDual``); any other
    use runs the elementwise dual op (:class:`sgflow.ops.pointwise.PointwiseDual`). Read by several layers (an embedding's SiLU read by
    every block), each recomputes it, all saving the same input. Plain tensors in ``parts``: an in-place op on
    the input later swaps new values into its DualTensor, not into these."""
    from sgflow.autodual.attention import LazyDual

    from sgflow.ops.pointwise import PointwiseDual

    parts = {"x": xp, "x_dot": xt, "spec": spec, "extra": extra}
    return LazyDual(xp.shape, xp, "pointwise", parts, lambda: make_dual(*PointwiseDual.apply(xp, xt, spec, extra)))


def _pointwise_parts(x, w, bias, dtypes=None):
    """The parts of a lazy elementwise node ``x`` that a layer with a plain weight ``w`` and bias of x's dtype
    (one of ``dtypes`` where given) can take, autocast off; else None."""
    from sgflow.autodual.attention import LazyDual

    if not (isinstance(x, LazyDual) and x._cache is None and x._kind == "pointwise"):
        return None
    parts = x._parts
    xp = parts["x"]
    if (isinstance(w, DualTensor) or isinstance(bias, DualTensor) or w.dtype != xp.dtype
            or (bias is not None and bias.dtype != xp.dtype) or (dtypes is not None and xp.dtype not in dtypes)
            or torch.is_autocast_enabled(xp.device.type)):
        return None
    return parts


def _pointwise_linear(x, w, bias):
    """The fused elementwise -> linear op for a lazy elementwise node ``x``, or None where it does not apply."""
    parts = _pointwise_parts(x, w, bias)
    if parts is None or parts["x"].dim() < 2:
        return None
    from sgflow.ops.conv_linear import PointwiseLinearDual

    note_rule("rule:pointwise+linear (fused op)")
    return make_dual(*tail_op(lambda: PointwiseLinearDual.apply(parts["x"], parts["x_dot"], w, bias, parts["spec"],
                                                                parts["extra"])))


def _pointwise_conv(x, w, bias, conf):
    """The fused elementwise -> convolution op for a lazy elementwise node ``x``, or None where it does not
    apply (half precision, whose convolution takes one call over both streams, stays on ``DualConv``)."""
    parts = _pointwise_parts(x, w, bias, (torch.float32, torch.float64))
    if parts is None or parts["x"].dim() != w.dim():  # an unbatched input: DualConv's path
        return None
    from sgflow.ops.conv_linear import PointwiseConvDual

    note_rule("rule:pointwise+conv (fused op)")
    return make_dual(*tail_op(lambda: PointwiseConvDual.apply(parts["x"], parts["x_dot"], w, bias, conf, parts["spec"],
                                                              parts["extra"])))


# GroupNorm -> per-sample modulation (EDM's ``addcmul(shift, group_norm(x), 1 + scale)``) -> SiLU / GELU -> conv as
# one op (sgflow.ops.gn_modulate: saves the GroupNorm's input only, where the rules apart keep three activation
# pairs). Read at call time: False turns the fusion off.
GN_MODULATE = True


def _modulation_dual(t, x):
    """``(primal, tangent or None)`` of a modulation operand that fits ``x`` (a plain tensor or computed dual tensor
    of x's dtype, per sample and channel), else None."""
    from sgflow.autodual.attention import LazyDual
    from sgflow.ops.gn_modulate import modulation_fits

    if isinstance(t, LazyDual) or not isinstance(t, torch.Tensor):
        return None
    tp = t._primal if isinstance(t, DualTensor) else t
    if tp.dtype != x.dtype or tp.device != x.device or not modulation_fits(tp, x):
        return None
    return tp, (t._tangent.to(tp.dtype) if isinstance(t, DualTensor) else None)


def gn_modulate_node(shift, t1, t2, value, materialize):
    """``shift + t1 * t2`` with one factor a lazy GroupNorm node and the other and ``shift`` per sample and
    channel: a lazy node that an activation keeps lazy and a convolution after it runs as the fused stage
    (:class:`sgflow.ops.gn_modulate.GNModulateActConvDual`); ``materialize()`` computes it unfused. None where
    the pattern does not apply."""
    from sgflow.autodual.attention import LazyDual, frozen

    if not GN_MODULATE or value != 1:
        return None
    gn, mult = (t1, t2) if isinstance(t1, LazyDual) else (t2, t1)
    if not (isinstance(gn, LazyDual) and gn._cache is None and gn._kind == "gn"):
        return None
    src = gn._parts["x"]
    xp = src._primal
    if xp.dtype not in (torch.float32, torch.float64) or xp.dim() < 3 or torch.is_autocast_enabled(xp.device.type):
        return None
    m = _modulation_dual(mult, xp)
    s = None if shift is None else _modulation_dual(shift, xp)
    if m is None or (shift is not None and s is None):
        return None
    mult, shift = frozen((mult, shift))  # the values the node was made from (in-place ops later)
    parts = dict(gn._parts, m=m, s=s)
    return LazyDual(gn._lazy_shape, gn._like, "gn_mod", parts, lambda: materialize(shift, gn, mult))


def gn_modulate_shift(node, shift, materialize):
    """``node + shift`` for a lazy ``group_norm(x) * m`` node (ADM's and diffusers' ``norm(h) * (1 + scale) +
    shift``, a mul then an add) and a per-sample shift: the node with its shift, still lazy; None otherwise."""
    from sgflow.autodual.attention import LazyDual, frozen

    if not (isinstance(node, LazyDual) and node._cache is None and node._kind == "gn_mod" and node._parts["s"] is None):
        return None
    s = _modulation_dual(shift, node._like)
    if s is None:
        return None
    shift = frozen(shift)
    return LazyDual(node._lazy_shape, node._like, "gn_mod", dict(node._parts, s=s), lambda: materialize(node, shift))


def gn_modulate_act(x, spec, extra):
    """An elementwise activation (``spec``, ``extra`` of sgflow.ops.pointwise) of a lazy modulated GroupNorm node:
    lazy again, for a convolution after it; None for any other input."""
    from sgflow.autodual.attention import LazyDual
    from sgflow.ops.pointwise import PointwiseDual

    if not (isinstance(x, LazyDual) and x._cache is None and x._kind == "gn_mod"):
        return None
    parts = dict(x._parts, spec=spec, extra=extra)

    def materialize():
        return make_dual(*PointwiseDual.apply(x._primal, x._tangent, spec, extra))

    return LazyDual(x._lazy_shape, x._like, "gn_mod_act", parts, materialize)


def _gn_modulate_conv(x, w, bias, conf):
    """The GroupNorm -> modulation -> activation -> convolution stage as the fused op for a lazy ``gn_mod_act``
    node ``x`` and a plain weight and bias of its dtype; None where it does not apply."""
    from sgflow.autodual.attention import LazyDual

    if not (isinstance(x, LazyDual) and x._cache is None and x._kind == "gn_mod_act"):
        return None
    p = x._parts
    src = p["x"]
    xp = src._primal
    if (isinstance(w, DualTensor) or isinstance(bias, DualTensor) or w.dtype != xp.dtype or w.dim() != xp.dim()
            or (bias is not None and bias.dtype != xp.dtype) or torch.is_autocast_enabled(xp.device.type)):
        return None
    from sgflow.ops.gn_modulate import GNModulateActConvDual

    (m, m_dot), s = p["m"], p["s"]
    s, s_dot = (None, None) if s is None else s
    note_rule("rule:group_norm+modulation+activation+conv (fused stage op)")
    return make_dual(*tail_op(lambda: GNModulateActConvDual.apply(
        xp, src._tangent.to(xp.dtype), p["w"], p["b"], p["g"], float(p["eps"]), m, m_dot, s, s_dot, w, bias, conf,
        p["spec"], p["extra"])))
