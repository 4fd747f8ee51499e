"""Dual GroupNorm -> SiLU -> Dropout -> (Resample) -> Conv2d stage as one autograd Function, and its
dropout-mask helpers.

Math: with ``(a, a_dot)`` the dual GroupNorm -> SiLU of ``(x, x_dot)`` (:mod:`sgflow.ops.groupnorm_silu`),
``m`` a bool keep-mask shared by both streams, ``p`` the dropout probability and ``R`` an optional linear
resampling by an integer factor s (``("nearest", s)``: nearest upsampling, ``F.interpolate(h, scale_factor=s)``;
``("avg", s)``: ``F.avg_pool2d(h, s)``; the U-Net up / down blocks' ``conv(resample(silu(norm(x))))``;
:mod:`sgflow.ops.resample`)::

    h = R(a m / (1 - p)),   h_dot = R(a_dot m / (1 - p))
    y = conv2d(h, W) + b,   y_dot = conv2d(h_dot, W)              (the bias has no tangent)

    backward: dh from the convolution, then R^T (upsampling: the sum over each s x s block; pooling: dh / s^2
    spread over it), then the dual GroupNorm -> SiLU backward.

Shapes: x, x_dot [B, C, H, W]; gn_weight, gn_bias [C] or None; conv_weight [Cout, C, kh, kw]; conv_bias
[Cout] or None; mask bool [B, C, H, W]; h [B, C, sH, sW] (upsampling), [B, C, H/s, W/s] (pooling) or
[B, C, H, W]; y, y_dot [B, Cout, H', W'] (stride 1, dilation 1, groups 1).

Layout of this file (see docs/DESIGN.md): ``GNSiLUConvDual`` autograd Function (forward and backward
through the dual GroupNorm -> SiLU's registered ops, :mod:`sgflow.ops.gn_silu_library`) -> dropout-mask
helpers ``make_dropout_mask`` / ``apply_dropout_mask`` -> functional API ``gn_silu_conv_dual``. Every
name here is importable from :mod:`sgflow.ops.groupnorm_silu` too.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from sgflow.ops.backend import autocast_dual
from sgflow.ops.gn_silu_library import _bwd, _check_param, _fwd, _op_backend, _param_grad, _validate
from sgflow.ops.library import add_unless_held
from sgflow.ops.recompute import unused_outputs
from sgflow.ops.resample import resample as resample_, resample_backward

__all__ = [
    "GNSiLUConvDual",
    "gn_silu_conv_dual",
    "make_dropout_mask",
    "apply_dropout_mask",
]


# ----------------------------------------------------------------------------------------------------
# 1. GroupNorm -> SiLU -> Dropout -> Conv2d stage Function
# ----------------------------------------------------------------------------------------------------
class GNSiLUConvDual(torch.autograd.Function):
    """The stage conv2d(resample(dropout(silu(group_norm(x))))) in primal + tangent form, as one Function.

    forward(x, x_dot, gn_weight, gn_bias, conv_weight, conv_bias, num_groups, eps, padding,
    dropout_mask, drop_scale, backend, resample=None) -> (y, y_dot, stats)

    - x, x_dot: [B, C, H, W]; gn_weight, gn_bias: [C] or None; conv_weight [Cout, C, k, k];
      conv_bias [Cout] or None; padding: (ph, pw); dropout_mask: bool [B, C, H, W] or None (shared
      by both streams, kept values scaled by drop_scale = 1/(1-p)); resample: None, ("nearest", s) or
      ("avg", s) (module doc; the resampled activation is recomputed in backward too: an upsampled one is
      s^2 times the input's size).
    - The activation is built as ONE stacked [2B, C, H, W] tensor (primal first) so the convolution
      runs once; conv bias is added to the primal half only (the tangent of a bias is zero).
    - Returns y, y_dot [B, Cout, H', W'] as the two halves (views) of one [2B, Cout, H', W'] buffer
      (and the [4, B, G] statistics, not differentiable):
      no copy, but autograd forbids modifying them in place (views created in a custom Function).
    - Saves only x, x_dot, the parameters, the [4, B, G] statistics and the bool mask; backward
      recomputes the stacked activation, gets the conv input/weight gradients in one
      ``aten.convolution_backward`` call and runs the GroupNorm-SiLU dual backward on its halves.
    """

    @staticmethod
    def forward(x, x_dot, gn_weight, gn_bias, conv_weight, conv_bias, num_groups: int, eps: float,
                padding: tuple[int, int], dropout_mask, drop_scale: float, backend: str, resample=None):
        B = x.shape[0]
        act = x.new_empty((2 * B, *x.shape[1:]))
        _, _, stats = _fwd(backend, x, x_dot, gn_weight, gn_bias, num_groups, eps,
                           mask=dropout_mask, drop_scale=drop_scale, out=act)
        unused = unused_outputs()  # a recomputed block's dead tail: only the (saved) statistics are needed
        if unused is not None:
            return unused[0], unused[1], stats
        act = resample_(act, resample)
        # Autocast off: the backward's convolution_backward runs on tensors of the input dtype, so the
        # forward must too (callers cast inputs themselves).
        with torch.autocast(x.device.type, enabled=False):
            out = F.conv2d(act, conv_weight, None, 1, padding)
        del act
        y = out[:B] if conv_bias is None else add_unless_held(out[:B], conv_bias.view(1, -1, 1, 1))
        return y, out[B:], stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_dot, gn_weight, gn_bias, conv_weight, conv_bias, num_groups, eps, padding, mask, drop_scale, backend, resample = inputs
        ctx.save_for_backward(x, x_dot, gn_weight, gn_bias, conv_weight, conv_bias, output[2], mask)
        ctx.mark_non_differentiable(output[2])
        ctx.num_groups = num_groups
        ctx.eps = eps
        ctx.padding = padding
        ctx.drop_scale = drop_scale
        ctx.backend = backend
        ctx.resample = resample
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable  # the group statistics are saved without a graph
    def backward(ctx, g_y, g_ydot, _g_stats):
        x, x_dot, gn_w, gn_b, conv_w, conv_b, stats, mask = ctx.saved_tensors
        need = ctx.needs_input_grad
        if g_y is None and g_ydot is None:
            return (None,) * 13
        B = x.shape[0]
        act = x.new_empty((2 * B, *x.shape[1:]))
        # Recompute instead of storing: the activation is as large as x and x_dot together.
        _fwd(ctx.backend, x, x_dot, gn_w, gn_b, ctx.num_groups, ctx.eps, mask=mask,
             drop_scale=ctx.drop_scale, out=act)
        act = resample_(act, ctx.resample)
        # Only run the convolution backward on the halves that received a gradient.
        if g_y is not None and g_ydot is not None:
            g_out, act_in = torch.cat([g_y, g_ydot]), act
        elif g_y is not None:
            g_out, act_in = g_y, act[:B]
        else:
            g_out, act_in = g_ydot, act[B:]
        need_act = any(need[:4])
        g_act, g_cw, _ = torch.ops.aten.convolution_backward(
            g_out.contiguous(), act_in, conv_w, None, [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1,
            [need_act, need[4], False],
        )
        del act, act_in, g_out
        if g_act is not None and ctx.resample is not None:
            g_act = resample_backward(g_act, ctx.resample)
        g_cb = None
        if conv_b is not None and need[5]:
            g_cb = (g_y.sum((0, 2, 3)) if g_y is not None else torch.zeros_like(conv_b)).to(conv_b.dtype)
        g_x = g_xd = g_gw = g_gb = None
        if need_act:
            if g_y is not None and g_ydot is not None:
                ga_y, ga_yd = g_act[:B], g_act[B:]
            elif g_y is not None:
                ga_y, ga_yd = g_act, None
            else:
                ga_y, ga_yd = None, g_act
            # The input gradients overwrite the conv's input gradient (ours, and dead after this):
            # two activation-sized buffers fewer at the backward's peak.
            g_x, g_xd, g_w, g_b = _bwd(ctx.backend, x, x_dot, gn_w, gn_b, stats, ga_y, ga_yd,
                                       ctx.num_groups, mask=mask, drop_scale=ctx.drop_scale,
                                       out=g_act if ga_y is not None and ga_yd is not None and g_act.is_contiguous() else None)
            g_x = g_x if need[0] else None
            g_xd = g_xd if need[1] else None
            g_gw = _param_grad(g_w, gn_w, need[2])
            g_gb = _param_grad(g_b, gn_b, need[3])
        return (g_x, g_xd, g_gw, g_gb, g_cw if need[4] else None, g_cb) + (None,) * 7


# ----------------------------------------------------------------------------------------------------
# 2. dropout masks and functional API
# ----------------------------------------------------------------------------------------------------
def make_dropout_mask(shape: Sequence[int], p: float, device=None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool keep-mask of ``shape``: each entry kept (True) with probability ``1 - p``."""
    return torch.empty(tuple(shape), dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)


def apply_dropout_mask(h: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with a given keep-mask: ``h * mask / (1 - p)`` (h: any shape; mask: bool, h's shape).

    For a network's plain forward that draws its own mask (so that a second path can reuse it). It is
    overridable by ``__torch_function__`` subclasses (``torch.overrides.handle_torch_function``): under
    ``sgflow.dualize``, ``conv(apply_dropout_mask(silu(group_norm(x)), mask, p))`` runs as one fused
    GroupNorm -> SiLU -> Dropout -> Conv2d stage with this mask, where ``h * mask`` would be an opaque
    product (its float multiplier and the conv's input saved for backward).
    """
    if torch.overrides.has_torch_function((h, mask)):
        return torch.overrides.handle_torch_function(apply_dropout_mask, (h, mask), h, mask, p)
    if mask.dtype != torch.bool or mask.shape != h.shape:
        raise ValueError(f"apply_dropout_mask: mask must be a bool tensor of shape {tuple(h.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"apply_dropout_mask: p must be in [0, 1), got {p}")
    return h * (mask.to(h.dtype) * (1.0 / (1.0 - p)))


def _conv_padding(padding, k: tuple[int, int]) -> tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if k[0] % 2 == 0 or k[1] % 2 == 0:
                raise ValueError("padding='same' needs an odd kernel size here")
            return (k[0] // 2, k[1] // 2)
        raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    if isinstance(padding, int):
        return (padding, padding)
    pad = tuple(int(p) for p in padding)
    if len(pad) != 2 or min(pad) < 0:
        raise ValueError(f"padding must be an int or a pair of non-negative ints, got {padding!r}")
    return pad


@autocast_dual
def gn_silu_conv_dual(
    x: torch.Tensor,
    x_dot: torch.Tensor,
    gn_weight: torch.Tensor | None,
    gn_bias: torch.Tensor | None,
    num_groups: int,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    padding,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str | None = None,
    *,
    dropout_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    resample: tuple[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual conv2d(resample(dropout(silu(group_norm(x))))) as one autograd Function (:class:`GNSiLUConvDual`).

    Args:
        x, x_dot: [B, C, H, W]. gn_weight, gn_bias: [C] or None. num_groups: divides C.
        conv_weight: [Cout, C, k, k] (x's dtype); conv_bias: [Cout] or None (primal only).
        padding: int, (ph, pw), "same" (odd k) or "valid"; stride 1, dilation 1, groups 1.
        dropout_p, training: dropout is active when ``training and dropout_p > 0``; one bool mask is
            drawn (from ``generator`` if given) and shared by primal and tangent, kept values are
            scaled by 1/(1-p).
        dropout_mask: optional bool [B, C, H, W] keep-mask to use instead of drawing one (tests,
            reproducibility); only allowed when dropout is active.
        resample: None, ``("nearest", s)`` (``F.interpolate(h, scale_factor=s)``, mode nearest) or ``("avg", s)``
            (``F.avg_pool2d(h, s)``; H and W divisible by s), s an integer >= 1, between the dropout and the
            conv: the U-Net up / down blocks' ``conv(resample(silu(norm(x))))``. Only x is saved; the
            resampled activation is recomputed in backward.

    Returns:
        (y, y_dot), each [B, Cout, H', W']: the two halves (views) of one stacked buffer, not to be
        modified in place.
    """
    _validate(x, x_dot, gn_weight, gn_bias, num_groups)
    if x.dim() != 4:
        raise ValueError(f"gn_silu_conv_dual needs x of shape [B, C, H, W], got {tuple(x.shape)}")
    C = x.shape[1]
    if not isinstance(conv_weight, torch.Tensor) or conv_weight.dim() != 4 or conv_weight.shape[1] != C:
        shape = tuple(conv_weight.shape) if isinstance(conv_weight, torch.Tensor) else type(conv_weight).__name__
        raise ValueError(f"conv_weight must have shape [Cout, {C}, kh, kw], got {shape}")
    _check_param("conv_weight", conv_weight, tuple(conv_weight.shape), x, same_dtype=True)
    _check_param("conv_bias", conv_bias, (conv_weight.shape[0],), x, same_dtype=True)
    pad = _conv_padding(padding, tuple(conv_weight.shape[2:]))
    resample = _check_resample(resample, x)
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    active = bool(training) and dropout_p > 0
    mask = None
    drop_scale = 1.0
    if dropout_mask is not None:
        if not active:
            raise ValueError("dropout_mask given but dropout is inactive (needs training=True and dropout_p > 0)")
        if dropout_mask.dtype != torch.bool or dropout_mask.shape != x.shape:
            raise ValueError(
                f"dropout_mask must be a bool tensor of shape {tuple(x.shape)}, "
                f"got {dropout_mask.dtype} {tuple(dropout_mask.shape)}"
            )
        if dropout_mask.device != x.device:
            raise ValueError(f"dropout_mask is on {dropout_mask.device} but x is on {x.device}")
    if active:
        mask = dropout_mask if dropout_mask is not None else make_dropout_mask(x.shape, dropout_p, x.device, generator)
        mask = mask.contiguous()
        drop_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    be = _op_backend(x, backend)
    return GNSiLUConvDual.apply(x, x_dot, gn_weight, gn_bias, conv_weight, conv_bias, num_groups, float(eps),
                                pad, mask, drop_scale, be, resample)[:2]


def _check_resample(resample, x: torch.Tensor):
    """``resample`` normalised to None or ``(mode, int s)``; ValueError naming what is wrong."""
    if resample is None:
        return None
    if not (isinstance(resample, (tuple, list)) and len(resample) == 2 and resample[0] in ("nearest", "avg")):
        raise ValueError(f"resample must be None, ('nearest', s) or ('avg', s), got {resample!r}")
    mode, s = resample
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(f"resample factor must be an integer >= 1, got {s!r}")
    if mode == "avg" and (x.shape[2] % s or x.shape[3] % s):
        raise ValueError(f"resample ('avg', {s}) needs H and W divisible by {s}, got {x.shape[2]}x{x.shape[3]}")
    return None if s == 1 else (mode, s)
