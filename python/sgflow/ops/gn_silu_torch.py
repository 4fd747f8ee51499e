"""The torch backend of the dual GroupNorm -> SiLU op (:mod:`sgflow.ops.groupnorm_silu`): its forward and
backward by the explicit formulas of that module's docstring, in plain PyTorch.

Shapes: x, x_dot [B, C, *spatial]; weight, bias [C] or None; the optional dropout keep-mask bool
[B, C, *spatial] (shared by both streams, kept values times ``drop_scale``); group statistics ``stats``
[4, B, G] (``mean, rstd, mean_dot, rstd_dot``, fp32 for fp16/bf16/fp32 inputs, fp64 for fp64). The
forward returns (y, y_dot, stats), the backward (g_x, g_xdot, g_weight, g_bias); either may write into a
caller's stacked ``out`` [2B, C, *spatial] buffer. Both run on chunks of whole samples (at most
``CHUNK_ELEMENTS[device type]`` elements, at least one sample). Registered as the ``sgflow::gn_silu_dual_*_torch`` ops by
:mod:`sgflow.ops.gn_silu_library`.
"""
from __future__ import annotations

import torch

from sgflow_kernels.dtypes import acc_dtype as _acc_dtype

__all__ = ["CHUNK_ELEMENTS"]


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
