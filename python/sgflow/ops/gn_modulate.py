r"""Dual GroupNorm -> per-sample modulation -> activation -> convolution as one op (EDM's adaptive norm:
``conv(silu(addcmul(shift, group_norm(x), 1 + scale)))``).

Shapes: ``x, x_dot: [B, C, *spatial]``; GroupNorm ``weight, bias: [C]`` or None; the modulation ``m, m_dot,
s, s_dot`` broadcastable to x with size 1 in every spatial dim (``[B, C, 1, 1]``: a scale and shift per
sample and channel, computed from the time embedding; a missing tangent is zero, a missing ``s`` is no
shift); convolution ``W, b`` and ``conf`` as :class:`sgflow.ops.conv_linear.DualConv`'s.

Forward
-------
    n, n_dot = GroupNorm(x) and its JVP along x_dot          (sgflow.ops.groupnorm)
    h     = s + n m,          h_dot = s_dot + n_dot m + n m_dot
    a     = f(h),             a_dot = f'(h) h_dot                 (sgflow.ops.pointwise: SiLU, GELU)
    y     = conv(a, W) + b,   y_dot = conv(a_dot, W)

Backward
--------
For cotangents ``G``, ``Gd`` of y, y_dot: the convolution's backward on (a, a_dot) gives ``Ga, Gad, dW, db``,
the activation dual's backward ``Gh, Ghd``; then, sums over the dims m (or s) broadcasts along,

    dm = sum(Gh n + Ghd n_dot),   dm_dot = sum(Ghd n),   ds = sum(Gh),   ds_dot = sum(Ghd)
    Gn = Gh m + Ghd m_dot,        Gnd = Ghd m

and GroupNorm's dual backward takes (Gn, Gnd) to ``dx, dx_dot`` and its weight / bias gradients.

Saved: x, x_dot, the weights and the four small modulation tensors; n, h, a and their tangents are
recomputed in backward. The ops apart keep three activation pairs of the stage (GroupNorm's input, its
output for the product's backward, the product for the activation's), this op one.

Module layout (see docs/DESIGN.md): :func:`gn_modulate_act_conv_dual_ref` (``torch.func.jvp`` of the plain
ops), :class:`GNModulateActConvDual` (applied by the dual engine's fusions, sgflow.autodual.rules.fusions,
for float32 / float64 outside autocast), the functional API :func:`gn_modulate_act_conv_dual`. No kernels:
PyTorch's group-norm kernels, the dual activation's (C++ on CPU) and the convolution's.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sgflow.ops.conv_linear import _activation_grads, _conv_grads
from sgflow.ops.groupnorm import _native_backward, _native_forward, _normalized, _per_channel
from sgflow.ops.pointwise import pointwise_dual_values
from sgflow.ops.recompute import unused_outputs

__all__ = ["gn_modulate_act_conv_dual_ref", "GNModulateActConvDual", "gn_modulate_act_conv_dual"]

_ACTIVATIONS = {"silu": lambda h, extra: F.silu(h), "gelu": lambda h, extra: F.gelu(h, approximate=extra)}


def _plain(x, gn_w, gn_b, groups, eps, m, s, weight, bias, conf, act, extra):
    h = F.group_norm(x, groups, gn_w, gn_b, eps) * m
    if s is not None:
        h = h + s
    return torch.ops.aten.convolution(_ACTIVATIONS[act](h, extra), weight, bias, *conf)


def gn_modulate_act_conv_dual_ref(x, x_dot, gn_w, gn_b, groups, eps, m, m_dot, s, s_dot, weight, bias, conf,
                                  act="silu", extra=None):
    """``(y, y_dot)`` by ``torch.func.jvp`` of the plain ops (reference; differentiable). ``act``: ``"silu"``
    or ``"gelu"`` (``extra`` its ``approximate``); other arguments as :func:`gn_modulate_act_conv_dual`."""
    zeros = torch.zeros_like

    def f(x_, m_, s_):
        return _plain(x_, gn_w, gn_b, groups, eps, m_, s_, weight, bias, conf, act, extra)

    if s is None:
        return torch.func.jvp(lambda x_, m_: f(x_, m_, None), (x, m), (x_dot, zeros(m) if m_dot is None else m_dot))
    return torch.func.jvp(f, (x, m, s), (x_dot, zeros(m) if m_dot is None else m_dot,
                                         zeros(s) if s_dot is None else s_dot))


def _modulated(x, x_dot, gn_w, gn_b, groups, eps, m, m_dot, s, s_dot):
    """``(h, h_dot)`` of the module doc, in two activation-sized buffers (GroupNorm's outputs, updated in place)."""
    n, n_dot = _native_forward(x, x_dot, gn_w, gn_b, groups, eps)
    h_dot = n_dot.mul_(m)
    if m_dot is not None:
        h_dot.addcmul_(n, m_dot)
    if s_dot is not None:
        h_dot.add_(s_dot)
    h = n.mul_(m)
    if s is not None:
        h.add_(s)
    return h, h_dot


def _affine_(t: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
    """``t w + g b`` in place on ``t`` (GroupNorm's per-channel affine, a missing one skipped)."""
    if w is not None:
        t.mul_(w)
    if b is not None:
        t.addcmul_(g, b)
    return t


def _reduced(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` summed over the dims a modulation of ``shape`` broadcasts along, never ``t`` itself (a 1x1 image's
    modulation has x's shape, and the buffers summed here are overwritten afterwards)."""
    # By shape, not by data pointer: traced (fake) tensors have none.
    return t.clone() if tuple(t.shape) == tuple(shape) else t.sum_to_size(shape)


class GNModulateActConvDual(torch.autograd.Function):
    r"""``(x, x_dot, gn_w, gn_b, groups, eps, m, m_dot, s, s_dot, W, b, conf, spec, extra) -> (y, y_dot)`` of the
    module doc (``spec``, ``extra``: the activation as in :class:`sgflow.ops.pointwise.PointwiseDual`; ``m_dot``,
    ``s``, ``s_dot`` may be None). Once differentiable."""

    @staticmethod
    def forward(ctx, x, x_dot, gn_w, gn_b, groups, eps, m, m_dot, s, s_dot, weight, bias, conf, spec, extra):
        ctx.groups, ctx.eps, ctx.conf, ctx.spec, ctx.extra = groups, eps, conf, spec, extra
        ctx.has_bias, ctx.gn_bias_dtype = bias is not None, None if gn_b is None else gn_b.dtype
        ctx.save_for_backward(x, x_dot, gn_w, gn_b, m, m_dot, s, s_dot, weight)
        ctx.set_materialize_grads(False)
        unused = unused_outputs()  # a recomputed block's dead tail (sgflow.ops.recompute.outputs_unused)
        if unused is not None:
            return unused
        h, h_dot = _modulated(x, x_dot, gn_w, gn_b, groups, eps, m, m_dot, s, s_dot)
        a, a_dot = pointwise_dual_values(h, h_dot, spec, extra)
        del h, h_dot
        y = torch.ops.aten.convolution(a, weight, bias, *conf)
        del a
        return y, torch.ops.aten.convolution(a_dot, weight, None, *conf)

    @staticmethod
    @once_differentiable  # GroupNorm's backward kernel has no derivative in PyTorch: a double backward raises
    def backward(ctx, g, g_dot):
        x, x_dot, gn_w, gn_b, m, m_dot, s, s_dot, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if g is None and g_dot is None:
            return (None,) * 15
        # A missing cotangent (one output unused: rare in SGFlow's loss) as zeros keeps one code path.
        g = torch.zeros_like(g_dot) if g is None else g
        g_dot = torch.zeros_like(g) if g_dot is None else g_dot
        h, h_dot = _modulated(x, x_dot, gn_w, gn_b, ctx.groups, ctx.eps, m, m_dot, s, s_dot)
        a, a_dot = pointwise_dual_values(h, h_dot, ctx.spec, ctx.extra)
        need_in = any(need[i] for i in (0, 1, 2, 3, 6, 7, 8, 9))
        grads_a, gw = _conv_grads(((g, a, need_in), (g_dot, a_dot, need_in)), weight, ctx.conf, need[10])
        del a, a_dot
        gb = g.sum([0] + list(range(2, g.dim()))) if ctx.has_bias and need[11] else None
        if not need_in:
            return (None,) * 10 + (gw, gb) + (None,) * 3
        gh, ghd = _activation_grads(ctx, h, h_dot, *grads_a, True, True)  # over the buffers: C++ on CPU
        del h, h_dot, grads_a
        # GroupNorm's normalised input xh and its tangent dh, made once for the modulation's gradients and for
        # GroupNorm's backward. With n = xh w + b, n_dot = dh w (w, b per channel):
        #   dm = sum((Gh xh + Ghd dh) w + Gh b),   dm_dot = sum(Ghd xh w + Ghd b),
        # each in one scratch buffer (n, n_dot are never made: no more activation-sized buffers than at the conv's
        # backward).
        normalized = _normalized(x, x_dot, ctx.groups, ctx.eps)
        xh, dh = normalized[0].view(x.shape), normalized[1].view(x.shape)
        w_ = None if gn_w is None else _per_channel(gn_w, xh)
        b_ = None if gn_b is None else _per_channel(gn_b, xh)
        dm = dm_dot = ds = ds_dot = None
        if need[6]:
            dm = _reduced(_affine_(torch.mul(gh, xh).addcmul_(ghd, dh), w_, b_, gh), m.shape)
        if need[7]:
            dm_dot = _reduced(_affine_(torch.mul(ghd, xh), w_, b_, ghd), m_dot.shape)
        if need[8]:
            ds = _reduced(gh, s.shape)
        if need[9]:
            ds_dot = _reduced(ghd, s_dot.shape)
        # Gn = Gh m + Ghd m_dot, Gnd = Ghd m, over the buffers (Ghd read before it is scaled).
        gn_ = gh.mul_(m)
        if m_dot is not None:
            gn_.addcmul_(ghd, m_dot)
        gnd = ghd.mul_(m)
        state = SimpleNamespace(saved_tensors=(x, x_dot, gn_w), num_groups=ctx.groups, eps=ctx.eps,
                                needs_input_grad=need[:4], has_bias=gn_b is not None, bias_dtype=ctx.gn_bias_dtype)
        dx, dxd, dgw, dgb = _native_backward(state, gn_, gnd, normalized)[:4]
        return dx, dxd, dgw, dgb, None, None, dm, dm_dot, ds, ds_dot, gw, gb, None, None, None


def _check(x, x_dot, m, m_dot, s, s_dot):
    if x.dim() < 3:
        raise ValueError(f"gn_modulate_act_conv_dual: x must be [B, C, *spatial], got shape {tuple(x.shape)}")
    if x_dot.shape != x.shape:
        raise ValueError(f"gn_modulate_act_conv_dual: x_dot shape {tuple(x_dot.shape)} must equal x's {tuple(x.shape)}")
    for name, t in (("m", m), ("m_dot", m_dot), ("s", s), ("s_dot", s_dot)):
        if t is None:
            continue
        if not modulation_fits(t, x):
            raise ValueError(f"gn_modulate_act_conv_dual: {name} of shape {tuple(t.shape)} must be [B or 1, C or 1, "
                             f"1, ...] for x of shape {tuple(x.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"gn_modulate_act_conv_dual: {name} is {t.dtype} on {t.device}, x is {x.dtype} on "
                            f"{x.device}")
    if (m_dot is not None and m_dot.shape != m.shape) or (s_dot is not None and (s is None or s_dot.shape != s.shape)):
        raise ValueError("gn_modulate_act_conv_dual: m_dot / s_dot must have the shapes of m / s")


def modulation_fits(t: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``t`` is a per-sample, per-channel modulation of ``x: [B, C, *spatial]``: same rank, size 1 in
    every spatial dim, B or 1 samples, C or 1 channels (so ``x * t`` has x's shape)."""
    return (t.dim() == x.dim() and t.shape[0] in (1, x.shape[0]) and t.shape[1] in (1, x.shape[1])
            and all(v == 1 for v in t.shape[2:]))


def gn_modulate_act_conv_dual(x, x_dot, gn_w, gn_b, num_groups, eps, m, m_dot, s, s_dot, weight, bias, conf=None,
                              act="silu", approximate="none"):
    """GroupNorm -> ``* m + s`` -> SiLU / GELU -> convolution with its JVP, saving only the stage's input.

    Args:
        x, x_dot: [B, C, *spatial] (float32 / float64); gn_w, gn_b: [C] or None; num_groups, eps: GroupNorm's.
        m, s: [B or 1, C or 1, 1, ...] (``s`` may be None); m_dot, s_dot: their tangents or None (zero).
        weight, bias: the convolution's; conf: ``(stride, padding, dilation, transposed, output_padding,
            groups)`` (default: stride 1, padding k // 2, 2-D). act: ``"silu"`` or ``"gelu"`` (``approximate``).

    Returns:
        ``y = conv(f(s + GN(x) m)) + b`` and its JVP along (x_dot, m_dot, s_dot), each the convolution's output.
    """
    from sgflow.autodual.rules.pointwise import _SPECS

    _check(x, x_dot, m, m_dot, s, s_dot)
    if act not in _ACTIVATIONS:
        raise ValueError(f"gn_modulate_act_conv_dual: act must be 'silu' or 'gelu', got {act!r}")
    if conf is None:
        nd = x.dim() - 2
        conf = ([1] * nd, [k // 2 for k in weight.shape[2:]], [1] * nd, False, [0] * nd, 1)
    extra = approximate if act == "gelu" else None
    return GNModulateActConvDual.apply(x, x_dot, gn_w, gn_b, int(num_groups), float(eps), m, m_dot, s, s_dot,
                                       weight, bias, conf, _SPECS[act], extra)
