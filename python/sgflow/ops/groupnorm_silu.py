"""Dual (primal + tangent) GroupNorm -> SiLU, and the fused GroupNorm -> SiLU -> Dropout -> Conv2d stage.

Math, per sample and group of ``n = (C / G) * prod(spatial)`` elements; ``x_dot`` is the tangent
direction and the affine parameters ``gamma`` (weight), ``beta`` (bias) carry no tangent::

    mu = mean(x),  var = mean((x - mu)^2),  r = (var + eps)^-1/2,  xh = (x - mu) r
    h = gamma xh + beta (per channel),  y = silu(h) = h sigmoid(h)
    mu_dot = mean(x_dot),  r_dot = -r^3 mean((x - mu)(x_dot - mu_dot))
    xh_dot = r (x_dot - mu_dot) + r_dot (x - mu)
           = r (x_dot - mu_dot) - xh mean(xh r (x_dot - mu_dot))
    h_dot = gamma xh_dot,  y_dot = silu'(h) h_dot,  silu'(h) = s (1 + h (1 - s)),  s = sigmoid(h)

Backward for cotangents ``(g_y, g_ydot)`` (with ``<.>`` the group mean, ``dd = x_dot - mu_dot``)::

    silu''(h) = s (1 - s) (2 + h (1 - 2 s))
    g_h = g_y silu'(h) + g_ydot silu''(h) h_dot,   g_hdot = g_ydot silu'(h)
    g_gamma = sum_{batch, spatial}(g_h xh + g_hdot xh_dot),   g_beta = sum_{batch, spatial} g_h
    a = gamma g_h,  c = gamma g_hdot
    g_xdot = r (c - <c> - xh <c xh>)
    g_x    = r (a - <a> - xh <a xh>)                                    # plain GroupNorm backward
           + r_dot (c - <c>) - xh (r^2 <c dd> + 3 r_dot <c xh>) - r^2 <c xh> dd   # second order

(the last line is the derivative of ``<c, xh_dot>`` with respect to ``x`` through ``r``, ``r_dot`` and
the centring).

Layout of this file (see docs/DESIGN.md): reference ``groupnorm_silu_dual_ref`` -> torch-backend
helpers -> ``GroupNormSiLUDual`` / ``GNSiLUConvDual`` autograd Functions -> functional API
``groupnorm_silu_dual`` / ``gn_silu_conv_dual``. Triton kernels live in ``sgflow_kernels/groupnorm_silu.py``
and are imported lazily, so ``sgflow`` imports without triton; the C++ CPU / CUDA kernels (backends
``cpp`` / ``cuda``) are csrc/, reached through ``sgflow.ops.cpp_ext``, also loaded lazily.

Group statistics (``stats``) are one ``[4, B, G]`` tensor: ``mean, rstd, mean_dot, rstd_dot``, in fp32
for fp16/bf16/fp32 inputs and fp64 for fp64 inputs; all arithmetic runs in that dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from sgflow.ops.backend import autocast_dual, resolve_backend
from sgflow.ops.library import add_unless_held, once as _once, register_loop_vmap
from sgflow_kernels.dtypes import acc_dtype as _acc_dtype

__all__ = [
    "groupnorm_silu_dual_ref",
    "GroupNormSiLUDual",
    "GNSiLUConvDual",
    "groupnorm_silu_dual",
    "gn_silu_conv_dual",
    "make_dropout_mask",
    "apply_dropout_mask",
]


# ----------------------------------------------------------------------------------------------------
# 1. reference
# ----------------------------------------------------------------------------------------------------
def groupnorm_silu_dual_ref(
    x: torch.Tensor,
    x_dot: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference dual GroupNorm -> SiLU by the explicit formulas of the module docstring.

    Plain differentiable PyTorch (no forward-AD), used as the readable specification.

    Args:
        x, x_dot: [B, C, *spatial]. weight, bias: [C] or None. ``C % num_groups == 0``.

    Returns:
        (y, y_dot), each [B, C, *spatial] in x's dtype (computed in fp32 for fp16/bf16).
    """
    B, C = x.shape[:2]
    G = num_groups
    acc = _acc_dtype(x.dtype)
    xg = x.to(acc).reshape(B, G, -1)
    xdg = x_dot.to(acc).reshape(B, G, -1)
    mu = xg.mean(-1, keepdim=True)
    d = xg - mu
    r = torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)
    xh = (d * r).reshape(B, C, -1)
    mu_dot = xdg.mean(-1, keepdim=True)
    u = r * (xdg - mu_dot)  # r (x_dot - mu_dot)
    xh_dot = (u - (d * r) * (d * r * u).mean(-1, keepdim=True)).reshape(B, C, -1)
    gamma = weight.to(acc).view(1, C, 1) if weight is not None else torch.ones((), dtype=acc, device=x.device)
    beta = bias.to(acc).view(1, C, 1) if bias is not None else torch.zeros((), dtype=acc, device=x.device)
    h = gamma * xh + beta
    h_dot = gamma * xh_dot
    s = torch.sigmoid(h)
    y = h * s
    y_dot = s * (1 + h * (1 - s)) * h_dot
    return y.to(x.dtype).reshape(x.shape), y_dot.to(x.dtype).reshape(x.shape)


# ----------------------------------------------------------------------------------------------------
# 2. torch backend
# ----------------------------------------------------------------------------------------------------
def _affine_cols(weight, bias, G, CG, acc, device):
    """gamma, beta as [1, G, CG, 1] in the accumulation dtype (1 / 0 when absent)."""
    w = weight.to(acc).view(1, G, CG, 1) if weight is not None else torch.ones((), dtype=acc, device=device)
    b = bias.to(acc).view(1, G, CG, 1) if bias is not None else torch.zeros((), dtype=acc, device=device)
    return w, b


# Statistics are per sample, so every sample is independent: the torch backend runs on chunks of whole
# samples to keep its elementwise temporaries (a handful of chunk-sized tensors) small next to the
# network's activations whatever the batch. Larger chunks on GPUs, where each op is a kernel launch.
CHUNK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 23}


def _sample_chunks(x: torch.Tensor) -> list[tuple[int, int]]:
    """[lo, hi) sample ranges of x [B, C, *spatial] holding at most CHUNK_ELEMENTS elements (>= 1 sample)."""
    B = x.shape[0]
    per_sample = max(1, x[0].numel()) if B else 1
    step = max(1, CHUNK_ELEMENTS.get(x.device.type, CHUNK_ELEMENTS["cuda"]) // per_sample)
    return [(lo, min(B, lo + step)) for lo in range(0, B, step)]


def _gn_silu_dual_fwd_torch(
    x: torch.Tensor,
    x_dot: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    mask: torch.Tensor | None = None,
    drop_scale: float = 1.0,
    out: torch.Tensor | None = None,
):
    """Torch-backend forward.

    Args:
        x, x_dot: [B, C, *spatial]; weight, bias: [C] or None.
        mask: optional bool [B, C, *spatial] dropout keep-mask shared by both streams (times drop_scale).
        out: optional [2B, C, *spatial] buffer; y goes to ``out[:B]``, y_dot to ``out[B:]``.

    Returns:
        (y, y_dot, stats): y, y_dot [B, C, *spatial] in x's dtype; stats [4, B, G] (see module doc).
    """
    B = x.shape[0]
    # Fresh x-shaped buffers (or the halves of `out`), never reshaped views of temporaries: views
    # returned by a custom Function may not be modified in place.
    if out is None:
        y_buf = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        yd_buf = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        y_buf, yd_buf = out[:B], out[B:]
    stats = torch.empty((4, B, num_groups), dtype=_acc_dtype(x.dtype), device=x.device)
    for lo, hi in _sample_chunks(x):
        _gn_silu_dual_fwd_chunk(x[lo:hi], x_dot[lo:hi], weight, bias, num_groups, eps,
                                None if mask is None else mask[lo:hi], drop_scale,
                                y_buf[lo:hi], yd_buf[lo:hi], stats[:, lo:hi])
    return y_buf, yd_buf, stats


def _gn_silu_dual_fwd_chunk(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale, y_out, yd_out, stats_out):
    """One chunk of samples of the forward: writes y_out, yd_out [b, C, *spatial] and stats_out [4, b, G]."""
    B, C = x.shape[:2]
    G = num_groups
    CG = C // G
    acc = _acc_dtype(x.dtype)
    xg = x.to(acc).reshape(B, G, CG, -1)
    xdg = x_dot.to(acc).reshape(B, G, CG, -1)
    mean = xg.mean((2, 3), keepdim=True)
    d = xg - mean
    rstd = torch.rsqrt(d.square().mean((2, 3), keepdim=True) + eps)
    mean_dot = xdg.mean((2, 3), keepdim=True)
    dd = xdg - mean_dot
    rstd_dot = -rstd.pow(3) * (d * dd).mean((2, 3), keepdim=True)
    xh_dot = dd.mul_(rstd).addcmul_(d, rstd_dot)
    del dd
    xh = d.mul_(rstd)
    w, b = _affine_cols(weight, bias, G, CG, acc, x.device)
    h = torch.addcmul(b, xh, w)
    del xh, d
    s = torch.sigmoid(h)
    # y_dot = silu'(h) gamma xh_dot with silu'(h) = s (1 + h (1 - s)); y = h s
    y_dot = (1 - s).mul_(h).add_(1).mul_(s).mul_(xh_dot).mul_(w)
    del xh_dot
    y = h.mul_(s)
    del s
    if mask is not None:
        m = mask.reshape(B, G, CG, -1).to(acc) * drop_scale
        y.mul_(m)
        y_dot.mul_(m)
    stats_out.copy_(torch.stack([mean, rstd, mean_dot, rstd_dot]).reshape(4, B, G))
    y_out.view(y.shape).copy_(y)
    yd_out.view(y_dot.shape).copy_(y_dot)


def _gn_silu_dual_bwd_torch(
    x: torch.Tensor,
    x_dot: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    g_y: torch.Tensor | None,
    g_ydot: torch.Tensor | None,
    num_groups: int,
    mask: torch.Tensor | None = None,
    drop_scale: float = 1.0,
    out: torch.Tensor | None = None,
):
    """Torch-backend backward by explicit formulas (module docstring); recomputes xh etc. from stats.

    Args:
        x, x_dot, weight, bias, mask, drop_scale: as given to the forward; stats: [4, B, G].
        g_y, g_ydot: [B, C, *spatial] cotangents of y, y_dot, either may be None.
        out: optional contiguous [2B, C, *spatial] buffer in x's dtype; g_x is written to ``out[:B]`` and
            g_xdot to ``out[B:]``. It may be the buffer holding g_y and g_ydot themselves (each chunk
            of samples is read completely before its rows are written).

    Returns:
        (g_x, g_xdot, g_weight, g_bias): g_x [B, C, *spatial] in x's dtype (zeros if both cotangents
        are None); g_xdot likewise or None when g_ydot is None; g_weight / g_bias [C] in the
        accumulation dtype (the caller casts them and drops them for absent parameters).
    """
    B, C = x.shape[:2]
    acc = _acc_dtype(x.dtype)
    if out is not None:
        g_x, g_xd = out[:B], (out[B:] if g_ydot is not None else None)
    else:
        g_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        g_xd = torch.empty_like(g_x) if g_ydot is not None else None
    g_w = torch.zeros(C, dtype=acc, device=x.device)
    g_b = torch.zeros(C, dtype=acc, device=x.device)
    for lo, hi in _sample_chunks(x):
        rows = slice(lo, hi)
        _gn_silu_dual_bwd_chunk(
            x[rows], x_dot[rows], weight, bias, stats[:, rows],
            None if g_y is None else g_y[rows], None if g_ydot is None else g_ydot[rows], num_groups,
            None if mask is None else mask[rows], drop_scale,
            g_x[rows], None if g_xd is None else g_xd[rows], g_w, g_b,
        )
    return g_x, g_xd, g_w, g_b


def _gn_silu_dual_bwd_chunk(x, x_dot, weight, bias, stats, g_y, g_ydot, num_groups, mask, drop_scale,
                            gx_out, gxd_out, g_w, g_b):
    """One chunk of samples of the backward: writes gx_out (and gxd_out) [b, C, *spatial], adds to g_w, g_b [C].

    Only tensors made here are modified in place (the incoming cotangents may alias each other or the
    caller's buffers).
    """
    B, C = x.shape[:2]
    G = num_groups
    CG = C // G
    acc = _acc_dtype(x.dtype)
    mean, rstd, mean_dot, rstd_dot = stats.to(acc).reshape(4, B, G, 1, 1).unbind(0)
    d = x.to(acc).reshape(B, G, CG, -1) - mean
    dd = x_dot.to(acc).reshape(B, G, CG, -1) - mean_dot
    xh_dot = torch.addcmul(dd * rstd, d, rstd_dot)
    xh = d.mul_(rstd)
    del d
    w, b = _affine_cols(weight, bias, G, CG, acc, x.device)
    h = torch.addcmul(b, xh, w)
    s = torch.sigmoid(h)
    one_minus_s = 1 - s
    sp = (h * one_minus_s).add_(1).mul_(s)  # silu'(h)
    m = mask.reshape(B, G, CG, -1).to(acc) * drop_scale if mask is not None else None

    def _cot(g):
        g = g.to(acc).reshape(B, G, CG, -1)
        return g * m if m is not None else g

    g_h = _cot(g_y) * sp if g_y is not None else torch.zeros_like(xh)
    g_hd = None
    if g_ydot is not None:
        gyd = _cot(g_ydot)
        # g_h += g_ydot silu''(h) gamma xh_dot, silu''(h) = s (1 - s) (2 + h (1 - 2 s))
        term = (1 - 2 * s).mul_(h).add_(2).mul_(s).mul_(one_minus_s).mul_(gyd).mul_(xh_dot).mul_(w)
        g_h.add_(term)
        del term
        g_hd = gyd * sp
        del gyd
    del h, s, one_minus_s, sp

    def gmean(t):
        return t.mean((2, 3), keepdim=True)

    g_b += g_h.sum((0, 3)).reshape(C)
    g_w += (g_h * xh).sum((0, 3)).reshape(C)
    if g_hd is not None:
        g_w += (g_hd * xh_dot).sum((0, 3)).reshape(C)
    del xh_dot

    a = g_h.mul_(w)
    # g_x = r (a - <a> - xh <a xh>)
    g_x = a.sub_(gmean(a * xh) * xh + gmean(a)).mul_(rstd)
    if g_hd is not None:
        c = g_hd.mul_(w)
        mcx, mcd = gmean(c * xh), gmean(c * dd)
        r2 = rstd * rstd
        # second order: + r_dot (c - <c>) - xh (r^2 <c dd> + 3 r_dot <c xh>) - r^2 <c xh> dd
        c_centred = c.sub_(gmean(c))
        g_x.addcmul_(c_centred, rstd_dot)
        g_x.addcmul_(xh, r2 * mcd + 3 * rstd_dot * mcx, value=-1)
        g_x.addcmul_(dd, r2 * mcx, value=-1)
        # g_xdot = r (c - <c> - xh <c xh>)
        gxd_out.view(c.shape).copy_(c_centred.addcmul_(xh, mcx, value=-1).mul_(rstd))
    gx_out.view(g_x.shape).copy_(g_x)


# ----------------------------------------------------------------------------------------------------
# registered ops: one torch.library op per kernel entry point and backend
# ----------------------------------------------------------------------------------------------------
# The same schemas as the C++ ops of csrc/sgflow_ops.cpp (``sgflow::gn_silu_dual_{fwd,fwd_out,bwd,bwd_out}``,
# CPU and CUDA kernels): the torch backend registers ``..._torch`` twins as custom ops, the Triton kernels
# ``..._triton`` twins as triton ops (registered on first use, so that sgflow imports without triton; at
# import on CUDA machines, see _register_eagerly).
# The fake (shape-only) implementations are shared by all three, and each non-mutating forward op gets
# an autograd formula (its backward op), so that every one of them is differentiable on its own and
# opaque to torch.compile. The `_out` variants write into a caller's stacked [2B, ...] buffer (the
# GN-SiLU-conv stage's convolution input); they mutate, so they have no autograd formula.
_FWD_SCHEMA = ("(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, int num_groups, float eps, "
               "Tensor? mask=None, float drop_scale=1.0) -> (Tensor y, Tensor y_dot, Tensor stats)")
_FWD_OUT_SCHEMA = ("(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, int num_groups, float eps, "
                   "Tensor? mask, float drop_scale, Tensor(a!) out) -> Tensor stats")
_BWD_SCHEMA = ("(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, Tensor stats, Tensor? g_y, "
               "Tensor? g_y_dot, int num_groups, Tensor? mask=None, float drop_scale=1.0) "
               "-> (Tensor g_x, Tensor? g_x_dot, Tensor g_weight, Tensor g_bias)")
_BWD_OUT_SCHEMA = ("(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, Tensor stats, Tensor? g_y, "
                   "Tensor? g_y_dot, int num_groups, Tensor? mask, float drop_scale, Tensor(a!) out) "
                   "-> (Tensor g_weight, Tensor g_bias)")


Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


def _fwd_fake(x, x_dot, weight, bias, num_groups, eps, mask=None, drop_scale=1.0):
    stats = x.new_empty((4, x.shape[0], num_groups), dtype=_acc_dtype(x.dtype))
    return x.new_empty(x.shape), x.new_empty(x.shape), stats


def _fwd_out_fake(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale, out):
    return x.new_empty((4, x.shape[0], num_groups), dtype=_acc_dtype(x.dtype))


def _bwd_fake(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask=None, drop_scale=1.0):
    C, acc = x.shape[1], _acc_dtype(x.dtype)
    g_xd = x.new_empty(x.shape) if g_y_dot is not None else None
    return x.new_empty(x.shape), g_xd, x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)


def _bwd_out_fake(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask, drop_scale, out):
    C, acc = x.shape[1], _acc_dtype(x.dtype)
    return x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)


def _fwd_setup_context(ctx, inputs, output):
    x, x_dot, weight, bias, num_groups, _eps, mask, drop_scale = inputs
    ctx.save_for_backward(x, x_dot, weight, bias, output[2], mask)
    ctx.num_groups, ctx.drop_scale = num_groups, drop_scale


def _fwd_autograd(bwd_op):
    """The autograd formula of a forward op: its backward op (gradients of x, x_dot, weight, bias)."""

    def backward(ctx, g_y, g_ydot, _g_stats):
        x, x_dot, weight, bias, stats, mask = ctx.saved_tensors
        g_x, g_xd, g_w, g_b = bwd_op(x, x_dot, weight, bias, stats, g_y, g_ydot, ctx.num_groups, mask,
                                     ctx.drop_scale)
        need = ctx.needs_input_grad
        return (g_x if need[0] else None, g_xd if need[1] else None, _param_grad(g_w, weight, need[2]),
                _param_grad(g_b, bias, need[3]), None, None, None, None)

    return backward


@torch.library.custom_op("sgflow::gn_silu_dual_fwd_torch", mutates_args=(), schema=_FWD_SCHEMA)
def _gn_fwd_torch_op(x, x_dot, weight, bias, num_groups, eps, mask=None, drop_scale=1.0):
    return _gn_silu_dual_fwd_torch(x, x_dot, weight, bias, num_groups, eps, mask=mask, drop_scale=drop_scale)


@torch.library.custom_op("sgflow::gn_silu_dual_fwd_out_torch", mutates_args=("out",), schema=_FWD_OUT_SCHEMA)
def _gn_fwd_out_torch_op(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale, out):
    return _gn_silu_dual_fwd_torch(x, x_dot, weight, bias, num_groups, eps, mask=mask, drop_scale=drop_scale,
                                   out=out)[2]


@torch.library.custom_op("sgflow::gn_silu_dual_bwd_torch", mutates_args=(), schema=_BWD_SCHEMA)
def _gn_bwd_torch_op(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask=None, drop_scale=1.0):
    return _gn_silu_dual_bwd_torch(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask=mask,
                                   drop_scale=drop_scale)


@torch.library.custom_op("sgflow::gn_silu_dual_bwd_out_torch", mutates_args=("out",), schema=_BWD_OUT_SCHEMA)
def _gn_bwd_out_torch_op(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask, drop_scale, out):
    return _gn_silu_dual_bwd_torch(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask=mask,
                                   drop_scale=drop_scale, out=out)[2:]


for _op, _fake in ((_gn_fwd_torch_op, _fwd_fake), (_gn_fwd_out_torch_op, _fwd_out_fake),
                   (_gn_bwd_torch_op, _bwd_fake), (_gn_bwd_out_torch_op, _bwd_out_fake)):
    _op.register_fake(_fake)
_gn_fwd_torch_op.register_autograd(_fwd_autograd(torch.ops.sgflow.gn_silu_dual_bwd_torch),
                                   setup_context=_fwd_setup_context)
for _op in (_gn_fwd_torch_op, _gn_bwd_torch_op):
    register_loop_vmap(_op)


@_once
def _triton_ops():
    """Register the Triton launchers as ``sgflow::gn_silu_dual_{fwd,fwd_out,bwd}_triton`` (on first use).

    ``triton_op`` infers its schema from annotations (it ignores ``schema=`` in torch 2.13; the module
    aliases ``Tensor``/``OptTensor`` keep them resolvable under postponed annotations) and cannot
    return None: ``gn_silu_dual_bwd_triton`` returns an empty ``g_x_dot`` when ``g_y_dot`` is None, which
    :func:`_bwd` maps back to None.
    """
    from sgflow_kernels import groupnorm_silu as K

    @torch.library.triton_op("sgflow::gn_silu_dual_fwd_triton", mutates_args=())
    def fwd(x: Tensor, x_dot: Tensor, weight: OptTensor, bias: OptTensor, num_groups: int, eps: float,
            mask: OptTensor = None, drop_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        return K.groupnorm_silu_dual_fwd(x, x_dot, weight, bias, num_groups, eps, mask=mask, drop_scale=drop_scale)

    @torch.library.triton_op("sgflow::gn_silu_dual_fwd_out_triton", mutates_args=("out",))
    def fwd_out(x: Tensor, x_dot: Tensor, weight: OptTensor, bias: OptTensor, num_groups: int, eps: float,
                mask: OptTensor, drop_scale: float, out: Tensor) -> Tensor:
        return K.groupnorm_silu_dual_fwd(x, x_dot, weight, bias, num_groups, eps, mask=mask, drop_scale=drop_scale,
                                         out=out)[2]

    @torch.library.triton_op("sgflow::gn_silu_dual_bwd_triton", mutates_args=())
    def bwd(x: Tensor, x_dot: Tensor, weight: OptTensor, bias: OptTensor, stats: Tensor, g_y: OptTensor,
            g_y_dot: OptTensor, num_groups: int, mask: OptTensor = None,
            drop_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g_x, g_xd, g_w, g_b = K.groupnorm_silu_dual_bwd(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups,
                                                        mask=mask, drop_scale=drop_scale)
        return g_x, (g_xd if g_xd is not None else x.new_empty(0)), g_w, g_b

    fwd.register_autograd(_fwd_autograd(_bwd_none(torch.ops.sgflow.gn_silu_dual_bwd_triton)),
                          setup_context=_fwd_setup_context)
    register_loop_vmap(fwd)
    register_loop_vmap(bwd)
    return torch.ops.sgflow


def _bwd_none(op):
    """A Triton backward op with None for the empty ``g_x_dot`` it returns when ``g_y_dot`` is None."""

    def call(x, x_dot, weight, bias, stats, g_y, g_ydot, *rest):
        g_x, g_xd, g_w, g_b = op(x, x_dot, weight, bias, stats, g_y, g_ydot, *rest)
        return g_x, (g_xd if g_ydot is not None else None), g_w, g_b

    return call


@_once
def _cpp_ops():
    """The C++ ops of sgflow._C (loaded on first use; cpp_ext adds their fakes and autograd formula)."""
    from sgflow.ops import cpp_ext

    if cpp_ext.load() is None:
        raise RuntimeError(cpp_ext.reason())
    return torch.ops.sgflow


def _register_eagerly() -> None:
    """Load the C++ ops (30 ms) and, on a CUDA machine, the Triton ops at import: a first registration
    inside a torch.compile trace is a graph break (dynamo does not trace torch.library registration)."""
    from sgflow.ops import cpp_ext
    from sgflow.ops.backend import triton_available

    cpp_ext.load()
    if torch.cuda.is_available() and triton_available():
        _triton_ops()


def ops_for(backend: str):
    """``(fwd, fwd_out, bwd, bwd_out)``: the registered ops of one backend (``bwd_out`` None for Triton,
    whose kernels are not checked on a GPU for writing over their own inputs)."""
    if backend in ("cpp", "cuda"):
        ns = _cpp_ops()
        return ns.gn_silu_dual_fwd, ns.gn_silu_dual_fwd_out, ns.gn_silu_dual_bwd, ns.gn_silu_dual_bwd_out
    if backend == "triton":
        ns = _triton_ops()
        return ns.gn_silu_dual_fwd_triton, ns.gn_silu_dual_fwd_out_triton, _bwd_none(ns.gn_silu_dual_bwd_triton), None
    ns = torch.ops.sgflow
    return ns.gn_silu_dual_fwd_torch, ns.gn_silu_dual_fwd_out_torch, ns.gn_silu_dual_bwd_torch, ns.gn_silu_dual_bwd_out_torch


def _fwd(backend, x, x_dot, weight, bias, num_groups, eps, mask=None, drop_scale=1.0, out=None):
    """(y, y_dot, stats) by the registered ops of ``backend``; with ``out`` ([2B, ...], contiguous) y and
    y_dot are its halves."""
    fwd, fwd_out, _, _ = ops_for(backend)
    if out is None:
        return fwd(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale)
    stats = fwd_out(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale, out)
    B = x.shape[0]
    return out[:B], out[B:], stats


def _bwd(backend, x, x_dot, weight, bias, stats, g_y, g_ydot, num_groups, mask=None, drop_scale=1.0, out=None):
    """(g_x, g_xdot, g_weight, g_bias); ``out``: see :func:`_gn_silu_dual_bwd_torch`, ignored by Triton."""
    _, _, bwd, bwd_out = ops_for(backend)
    if out is None or bwd_out is None:
        return bwd(x, x_dot, weight, bias, stats, g_y, g_ydot, num_groups, mask, drop_scale)
    g_w, g_b = bwd_out(x, x_dot, weight, bias, stats, g_y, g_ydot, num_groups, mask, drop_scale, out)
    B = x.shape[0]
    return out[:B], (out[B:] if g_ydot is not None else None), g_w, g_b


def _param_grad(g: torch.Tensor, p: torch.Tensor | None, needed: bool):
    return g.to(p.dtype) if (p is not None and needed) else None


# ----------------------------------------------------------------------------------------------------
# 3. GroupNorm -> SiLU Function
# ----------------------------------------------------------------------------------------------------
class GroupNormSiLUDual(torch.autograd.Function):
    """(x, x_dot, weight, bias, num_groups, eps, backend) -> (y, y_dot, stats): dual silu(group_norm(x)),
    y and y_dot [B, C, *spatial], stats [4, B, G] (not differentiable) by the backend's registered ops.

    Saves x, x_dot, weight, bias and the statistics; backward recomputes everything else.
    Both outputs are fresh tensors (not views), so they may be modified in place downstream.
    ``torch.func.vmap`` runs through it (the ops' vmap rules loop over the vmapped dim).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_dot, weight, bias, num_groups: int, eps: float, backend: str):
        return _fwd(backend, x, x_dot, weight, bias, num_groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_dot, weight, bias, num_groups, _eps, backend = inputs
        ctx.save_for_backward(x, x_dot, weight, bias, output[2])
        ctx.mark_non_differentiable(output[2])
        ctx.num_groups = num_groups
        ctx.backend = backend
        # Let backward see which output actually received a gradient (skip the tangent terms if not).
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable  # the group statistics are saved without a graph
    def backward(ctx, g_y, g_ydot, _g_stats):
        x, x_dot, weight, bias, stats = ctx.saved_tensors
        if g_y is None and g_ydot is None:
            return (None,) * 7
        g_x, g_xd, g_w, g_b = _bwd(ctx.backend, x, x_dot, weight, bias, stats, g_y, g_ydot, ctx.num_groups)
        need = ctx.needs_input_grad
        return (
            g_x if need[0] else None,
            g_xd if need[1] else None,
            _param_grad(g_w, weight, need[2]),
            _param_grad(g_b, bias, need[3]),
            None, None, None,
        )


# ----------------------------------------------------------------------------------------------------
# 4. GroupNorm -> SiLU -> Dropout -> Conv2d stage Function
# ----------------------------------------------------------------------------------------------------
class GNSiLUConvDual(torch.autograd.Function):
    """The stage conv2d(dropout(silu(group_norm(x)))) in primal + tangent form, as one Function.

    forward(x, x_dot, gn_weight, gn_bias, conv_weight, conv_bias, num_groups, eps, padding,
    dropout_mask, drop_scale, backend) -> (y, y_dot, stats)

    - x, x_dot: [B, C, H, W]; gn_weight, gn_bias: [C] or None; conv_weight [Cout, C, k, k];
      conv_bias [Cout] or None; padding: (ph, pw); dropout_mask: bool [B, C, H, W] or None (shared
      by both streams, kept values scaled by drop_scale = 1/(1-p)).
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
                padding: tuple[int, int], dropout_mask, drop_scale: float, backend: str):
        B = x.shape[0]
        act = x.new_empty((2 * B, *x.shape[1:]))
        _, _, stats = _fwd(backend, x, x_dot, gn_weight, gn_bias, num_groups, eps,
                           mask=dropout_mask, drop_scale=drop_scale, out=act)
        # Autocast off: the backward's convolution_backward runs on tensors of the input dtype, so the
        # forward must too (callers cast inputs themselves).
        with torch.autocast(x.device.type, enabled=False):
            out = F.conv2d(act, conv_weight, None, 1, padding)
        del act
        y = out[:B] if conv_bias is None else add_unless_held(out[:B], conv_bias.view(1, -1, 1, 1))
        return y, out[B:], stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_dot, gn_weight, gn_bias, conv_weight, conv_bias, num_groups, eps, padding, mask, drop_scale, backend = inputs
        ctx.save_for_backward(x, x_dot, gn_weight, gn_bias, conv_weight, conv_bias, output[2], mask)
        ctx.mark_non_differentiable(output[2])
        ctx.num_groups = num_groups
        ctx.eps = eps
        ctx.padding = padding
        ctx.drop_scale = drop_scale
        ctx.backend = backend
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable  # the group statistics are saved without a graph
    def backward(ctx, g_y, g_ydot, _g_stats):
        x, x_dot, gn_w, gn_b, conv_w, conv_b, stats, mask = ctx.saved_tensors
        need = ctx.needs_input_grad
        if g_y is None and g_ydot is None:
            return (None,) * 12
        B = x.shape[0]
        act = x.new_empty((2 * B, *x.shape[1:]))
        # Recompute instead of storing: the activation is as large as x and x_dot together.
        _fwd(ctx.backend, x, x_dot, gn_w, gn_b, ctx.num_groups, ctx.eps, mask=mask,
             drop_scale=ctx.drop_scale, out=act)
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
        return (g_x, g_xd, g_gw, g_gb, g_cw if need[4] else None, g_cb) + (None,) * 6


# ----------------------------------------------------------------------------------------------------
# 5. functional API
# ----------------------------------------------------------------------------------------------------
def _check_param(name: str, p: torch.Tensor | None, shape: tuple, x: torch.Tensor, same_dtype: bool):
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if same_dtype:
        if p.dtype != x.dtype:
            raise TypeError(f"{name} dtype {p.dtype} does not match x dtype {x.dtype}")
    elif p.dtype != x.dtype and not (p.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(
            f"{name} dtype {p.dtype} does not match x dtype {x.dtype} "
            "(float32 parameters are allowed with float16/bfloat16 inputs)"
        )


def _validate(x, x_dot, weight, bias, num_groups):
    for name, t in (("x", x), ("x_dot", x_dot)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B, C, *spatial], got {tuple(x.shape)}")
    if x_dot.shape != x.shape:
        raise ValueError(f"x_dot shape {tuple(x_dot.shape)} does not match x shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x_dot.dtype != x.dtype:
        raise TypeError(f"x_dot dtype {x_dot.dtype} does not match x dtype {x.dtype}")
    if x_dot.device != x.device:
        raise ValueError(f"x_dot is on {x_dot.device} but x is on {x.device}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    C = x.shape[1]
    if C % num_groups != 0:
        raise ValueError(f"number of channels C={C} is not divisible by num_groups={num_groups}")
    _check_param("weight", weight, (C,), x, same_dtype=False)
    _check_param("bias", bias, (C,), x, same_dtype=False)


def _op_backend(x: torch.Tensor, backend: str | None) -> str:
    # "torch" | "triton" | "cpp" (C++ CPU kernels) | "cuda" (CUDA kernels of sgflow._C); automatic:
    # the C++ kernels on CPU where built (measured faster, see sgflow.ops.backend), Triton on CUDA.
    return resolve_backend(x, backend, op="gn_silu")


@autocast_dual
def groupnorm_silu_dual(
    x: torch.Tensor,
    x_dot: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = silu(group_norm(x, num_groups, weight, bias, eps)) and its JVP y_dot in direction x_dot.

    Args:
        x, x_dot: [B, C, *spatial] (any number of spatial dims, including none), same dtype/device.
        weight, bias: [C] or None; x's dtype, or float32 with float16/bfloat16 x. No tangent.
        num_groups: G, must divide C.
        backend: "torch" | "triton" | "cpp" (C++ CPU kernels) | "cuda" (CUDA kernels of sgflow._C) |
            None (automatic, see sgflow.ops.backend).

    Returns:
        (y, y_dot), each [B, C, *spatial] in x's dtype; differentiable w.r.t. x, x_dot, weight, bias.
    """
    _validate(x, x_dot, weight, bias, num_groups)
    be = _op_backend(x, backend)
    return GroupNormSiLUDual.apply(x, x_dot, weight, bias, num_groups, float(eps), be)[:2]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual conv2d(dropout(silu(group_norm(x)))) as one autograd Function (:class:`GNSiLUConvDual`).

    Args:
        x, x_dot: [B, C, H, W]. gn_weight, gn_bias: [C] or None. num_groups: divides C.
        conv_weight: [Cout, C, k, k] (x's dtype); conv_bias: [Cout] or None (primal only).
        padding: int, (ph, pw), "same" (odd k) or "valid"; stride 1, dilation 1, groups 1.
        dropout_p, training: dropout is active when ``training and dropout_p > 0``; one bool mask is
            drawn (from ``generator`` if given) and shared by primal and tangent, kept values are
            scaled by 1/(1-p).
        dropout_mask: optional bool [B, C, H, W] keep-mask to use instead of drawing one (tests,
            reproducibility); only allowed when dropout is active.

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
                                pad, mask, drop_scale, be)[:2]


_register_eagerly()
