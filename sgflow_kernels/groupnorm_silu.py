"""Triton kernels for the dual (primal + tangent) GroupNorm -> SiLU op.

Math, per sample ``b`` and group ``g`` of ``n = (C / G) * S`` elements (``S`` = product of the spatial
dims), with ``x_dot`` the tangent direction (``gamma``/``beta`` carry no tangent)::

    mu     = mean(x)                     mu_dot   = mean(x_dot)
    d      = x - mu                      dd       = x_dot - mu_dot
    r      = (mean(d^2) + eps)^-1/2      r_dot    = -r^3 mean(d dd)
    xh     = r d                         xh_dot   = r dd + r_dot d
    h      = gamma xh + beta             h_dot    = gamma xh_dot
    y      = h s,  s = sigmoid(h)        y_dot    = silu'(h) h_dot,  silu'(h) = s (1 + h (1 - s))

optionally followed by a dropout mask ``m`` shared by both streams: ``y *= m / (1 - p)``, same for
``y_dot``.

Backward, for upstream gradients ``g_y``, ``g_ydot`` (already multiplied by the dropout mask/scale)::

    silu''(h) = s (1 - s) (2 + h (1 - 2 s))
    g_h     = g_y silu'(h) + g_ydot silu''(h) h_dot         g_hdot = g_ydot silu'(h)
    g_gamma = sum_{b, spatial} (g_h xh + g_hdot xh_dot)      g_beta = sum_{b, spatial} g_h
    a = gamma g_h,  c = gamma g_hdot,  group means <.> over the n elements:
    g_xdot  = r (c - <c> - xh <c xh>)
    g_x     = r (a - <a> - xh <a xh>)                                   (first order, plain GroupNorm)
            + r_dot (c - <c>) - xh (r^2 <c dd> + 3 r_dot <c xh>) - r^2 <c xh> dd      (through xh_dot)

Layout: NCHW-contiguous tensors viewed as ``[B, C, S]``; one program per (sample, group), whose
``C/G`` channels are one contiguous run of ``(C/G) * S`` elements. A group is processed as a 2-D tile
``[BLOCK_C, BLOCK_S]`` (channels x spatial) so per-channel sums for ``g_gamma``/``g_beta`` are a row
reduction. When the whole group fits one tile (``ONE_TILE``) it is loaded once and kept in registers;
otherwise the kernels loop over the group (forward: 3 sweeps, backward: 2 sweeps).

Accumulation (statistics, reductions, elementwise math) is in the statistics buffer's dtype: fp32 for
fp16/bf16/fp32 inputs, fp64 for fp64 inputs. Scalar float arguments are passed to Triton as fp32, so
``eps`` and the dropout scale are split into an fp32 (hi, lo) pair and recombined in the accumulation
dtype to keep fp64 results exact to ~1e-14.

This module imports triton at the top: only import it lazily (sgflow itself imports without triton).
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from sgflow_kernels.dtypes import acc_dtype as _acc_dtype

# Largest one-tile group (elements). Above it the kernels loop over the group (the backward then reads
# x, x_dot and both output gradients twice). Offline sm_90 compiles (benchmarks/compile_check_sm90.py
# style): an 8192-element backward tile at 16 warps spills 8-16 B per thread for fp32/bf16 with the same
# 128 registers as the looped kernel, so 8192 is the limit there and one-tile covers the cifar10 U-Net's
# 256-channel 32x32 stages (CG * S = 8 * 1024); fp64 values need twice the registers (2.7 KB spilled at
# 8192), hence its smaller backward limit.
FWD_MAX_TILE = 8192
BWD_MAX_TILE = 8192
BWD_MAX_TILE_FP64 = 4096
# Elements per thread that a tile is spread over when picking num_warps.
FWD_ELEMS_PER_THREAD = 16
BWD_ELEMS_PER_THREAD = 8


# ----------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(c0, s0, CG, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets of one [BLOCK_C, BLOCK_S] tile inside a group (row = local channel, col = spatial)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    offs_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    mask = (offs_c[:, None] < CG) & (offs_s[None, :] < S)
    offs = offs_c[:, None] * S + offs_s[None, :]
    return offs_c, offs, mask


@triton.jit
def _load_tile(PTR, base, offs, mask, acc_ty):
    return tl.load(PTR + base + offs, mask=mask, other=0.0).to(acc_ty)


@triton.jit
def _load_affine(W_ptr, BIAS_ptr, g, offs_c, CG, acc_ty):
    """gamma, beta of the tile's channels as [BLOCK_C, 1] columns."""
    cmask = offs_c < CG
    w = tl.load(W_ptr + g * CG + offs_c, mask=cmask, other=0.0).to(acc_ty)
    b = tl.load(BIAS_ptr + g * CG + offs_c, mask=cmask, other=0.0).to(acc_ty)
    return w[:, None], b[:, None]


@triton.jit
def _load_scaled_mask(MASK_ptr, base, offs, mask, scale, acc_ty):
    """Dropout keep-mask (uint8 view of a bool tensor) times 1/(1-p), in the accumulation dtype."""
    m = tl.load(MASK_ptr + base + offs, mask=mask, other=0)
    return tl.where(m != 0, scale, 0.0).to(acc_ty)


@triton.jit
def _dual_tile(x, xd, w, b, mean, rstd, mean_dot, rstd_dot, mask):
    """Recompute the normalised tile and its tangent from the group statistics.

    Padding lanes get d = dd = 0 so that they drop out of every group reduction.
    """
    d = tl.where(mask, x - mean, 0.0)
    dd = tl.where(mask, xd - mean_dot, 0.0)
    xh = d * rstd
    xhd = dd * rstd + d * rstd_dot
    h = xh * w + b
    s = 1.0 / (1.0 + tl.exp(-h))
    sp = s * (1.0 + h * (1.0 - s))  # silu'(h)
    return d, dd, xh, xhd, h, s, sp


@triton.jit
def _bwd_tile(x, xd, w, b, gy, gyd, mean, rstd, mean_dot, rstd_dot, mask,
              HAS_GY: tl.constexpr, HAS_GYD: tl.constexpr):
    """Per-element backward quantities of one tile: (dd, xh, xhd, g_h, g_hdot)."""
    d, dd, xh, xhd, h, s, sp = _dual_tile(x, xd, w, b, mean, rstd, mean_dot, rstd_dot, mask)
    if HAS_GY:
        g_h = gy * sp
    else:
        g_h = tl.zeros_like(x)
    if HAS_GYD:
        spp = s * (1.0 - s) * (2.0 + h * (1.0 - 2.0 * s))  # silu''(h)
        g_h += gyd * spp * (w * xhd)
        g_hd = gyd * sp
    else:
        g_hd = tl.zeros_like(x)
    return dd, xh, xhd, g_h, g_hd


@triton.jit
def _fwd_store_tile(Y_ptr, YD_ptr, MASK_ptr, base, offs, mask, x, xd, w, b, mean, rstd, mean_dot, rstd_dot,
                    scale, acc_ty, HAS_MASK: tl.constexpr):
    """y = silu(h) and y_dot = silu'(h) gamma xh_dot for one tile (dropout mask applied), stored."""
    d, dd, xh, xhd, h, s, sp = _dual_tile(x, xd, w, b, mean, rstd, mean_dot, rstd_dot, mask)
    y = h * s
    yd = sp * (w * xhd)
    if HAS_MASK:
        m = _load_scaled_mask(MASK_ptr, base, offs, mask, scale, acc_ty)
        y = y * m
        yd = yd * m
    tl.store(Y_ptr + base + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(YD_ptr + base + offs, yd.to(YD_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_load_tile(X_ptr, XD_ptr, W_ptr, BIAS_ptr, MASK_ptr, GY_ptr, GYD_ptr, base, g, c0, s0, CG, S, scale,
                   mean, rstd, mean_dot, rstd_dot, acc_ty,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                   HAS_MASK: tl.constexpr, HAS_GY: tl.constexpr, HAS_GYD: tl.constexpr):
    """Load one tile of x, x_dot and the output gradients (dropout mask applied) and return
    (offs_c, offs, mask, w, dd, xh, xhd, g_h, g_hdot) for it."""
    offs_c, offs, mask = _tile_offsets(c0, s0, CG, S, BLOCK_C, BLOCK_S)
    x = _load_tile(X_ptr, base, offs, mask, acc_ty)
    xd = _load_tile(XD_ptr, base, offs, mask, acc_ty)
    w, b = _load_affine(W_ptr, BIAS_ptr, g, offs_c, CG, acc_ty)
    gy = x  # placeholders so the names exist when a stream has no gradient
    gyd = x
    if HAS_GY:
        gy = _load_tile(GY_ptr, base, offs, mask, acc_ty)
    if HAS_GYD:
        gyd = _load_tile(GYD_ptr, base, offs, mask, acc_ty)
    if HAS_MASK:
        m = _load_scaled_mask(MASK_ptr, base, offs, mask, scale, acc_ty)
        gy = gy * m
        gyd = gyd * m
    dd, xh, xhd, g_h, g_hd = _bwd_tile(x, xd, w, b, gy, gyd, mean, rstd, mean_dot, rstd_dot, mask, HAS_GY, HAS_GYD)
    return offs_c, offs, mask, w, dd, xh, xhd, g_h, g_hd


@triton.jit
def _input_grads(w, g_h, g_hd, xh, dd, rstd, rstd_dot, ma, max_, mc, mcx, mcd, HAS_GYD: tl.constexpr):
    """(g_x, g_xdot) of a tile from the group means of the module docstring (g_xdot = g_x if no HAS_GYD)."""
    a = w * g_h
    gx = rstd * (a - ma - xh * max_)
    gxd = gx
    if HAS_GYD:
        c = w * g_hd
        gxd = rstd * (c - mc - xh * mcx)
        gx += rstd_dot * (c - mc) - xh * (rstd * rstd * mcd + 3.0 * rstd_dot * mcx) - (rstd * rstd * mcx) * dd
    return gx, gxd


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _groupnorm_silu_dual_fwd_kernel(
    X_ptr,  # [B, C, S] primal input, contiguous
    XD_ptr,  # [B, C, S] tangent input, contiguous
    W_ptr,  # [C] GroupNorm gamma
    BIAS_ptr,  # [C] GroupNorm beta
    MASK_ptr,  # [B, C, S] uint8 dropout keep-mask (read only if HAS_MASK)
    Y_ptr,  # [B, C, S] primal output (may be the first half of a stacked [2B, C, S] buffer)
    YD_ptr,  # [B, C, S] tangent output (may be the second half of the same buffer)
    STATS_ptr,  # [4, B*G] accumulation dtype: mean, rstd, mean_dot, rstd_dot
    BG,  # B * G (stride between the four stats planes)
    S,  # spatial size (product of the spatial dims)
    G,  # number of groups
    CG,  # channels per group, C // G
    EPS_HI, EPS_LO,  # eps = EPS_HI + EPS_LO (fp32 pair, see module docstring)
    SCALE_HI, SCALE_LO,  # dropout scale 1/(1-p) as an fp32 pair
    BLOCK_C: tl.constexpr,  # channels per tile (power of 2)
    BLOCK_S: tl.constexpr,  # spatial positions per tile (power of 2)
    ONE_TILE: tl.constexpr,  # BLOCK_C >= CG and BLOCK_S >= S: the group is one register tile
    HAS_MASK: tl.constexpr,  # apply the dropout mask
):
    pid = tl.program_id(0)  # = b * G + g
    g = pid % G
    # b*C*S + g*CG*S == pid*CG*S; int64 because B*C*S can exceed 2^31.
    base = pid.to(tl.int64) * CG * S
    acc_ty = STATS_ptr.dtype.element_ty
    nf = tl.cast(CG * S, acc_ty)
    eps = tl.cast(EPS_HI, acc_ty) + tl.cast(EPS_LO, acc_ty)
    scale = tl.cast(SCALE_HI, acc_ty) + tl.cast(SCALE_LO, acc_ty)

    if ONE_TILE:
        offs_c, offs, mask = _tile_offsets(0, 0, CG, S, BLOCK_C, BLOCK_S)
        x = _load_tile(X_ptr, base, offs, mask, acc_ty)
        xd = _load_tile(XD_ptr, base, offs, mask, acc_ty)
        mean = tl.sum(x) / nf
        mean_dot = tl.sum(xd) / nf
        # Two-pass (centred) variance from registers: no cancellation, no extra memory traffic.
        d = tl.where(mask, x - mean, 0.0)
        dd = tl.where(mask, xd - mean_dot, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d) / nf + eps)
        rstd_dot = -rstd * rstd * rstd * (tl.sum(d * dd) / nf)
        w, b = _load_affine(W_ptr, BIAS_ptr, g, offs_c, CG, acc_ty)
        _fwd_store_tile(Y_ptr, YD_ptr, MASK_ptr, base, offs, mask, x, xd, w, b, mean, rstd, mean_dot, rstd_dot,
                        scale, acc_ty, HAS_MASK)
    else:
        # sweep 1: means
        acc_x = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
        acc_xd = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
        for c0 in range(0, CG, BLOCK_C):
            for s0 in range(0, S, BLOCK_S):
                offs_c, offs, mask = _tile_offsets(c0, s0, CG, S, BLOCK_C, BLOCK_S)
                acc_x += _load_tile(X_ptr, base, offs, mask, acc_ty)
                acc_xd += _load_tile(XD_ptr, base, offs, mask, acc_ty)
        mean = tl.sum(acc_x) / nf
        mean_dot = tl.sum(acc_xd) / nf
        # sweep 2: centred second moments (stable two-pass variance; the re-read mostly hits L2)
        acc_dd = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
        acc_ddt = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
        for c0 in range(0, CG, BLOCK_C):
            for s0 in range(0, S, BLOCK_S):
                offs_c, offs, mask = _tile_offsets(c0, s0, CG, S, BLOCK_C, BLOCK_S)
                d = tl.where(mask, _load_tile(X_ptr, base, offs, mask, acc_ty) - mean, 0.0)
                dd = tl.where(mask, _load_tile(XD_ptr, base, offs, mask, acc_ty) - mean_dot, 0.0)
                acc_dd += d * d
                acc_ddt += d * dd
        rstd = 1.0 / tl.sqrt(tl.sum(acc_dd) / nf + eps)
        rstd_dot = -rstd * rstd * rstd * (tl.sum(acc_ddt) / nf)
        # sweep 3: outputs
        for c0 in range(0, CG, BLOCK_C):
            for s0 in range(0, S, BLOCK_S):
                offs_c, offs, mask = _tile_offsets(c0, s0, CG, S, BLOCK_C, BLOCK_S)
                x = _load_tile(X_ptr, base, offs, mask, acc_ty)
                xd = _load_tile(XD_ptr, base, offs, mask, acc_ty)
                w, b = _load_affine(W_ptr, BIAS_ptr, g, offs_c, CG, acc_ty)
                _fwd_store_tile(Y_ptr, YD_ptr, MASK_ptr, base, offs, mask, x, xd, w, b, mean, rstd, mean_dot,
                                rstd_dot, scale, acc_ty, HAS_MASK)

    tl.store(STATS_ptr + pid, mean)
    tl.store(STATS_ptr + BG + pid, rstd)
    tl.store(STATS_ptr + 2 * BG + pid, mean_dot)
    tl.store(STATS_ptr + 3 * BG + pid, rstd_dot)


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _groupnorm_silu_dual_bwd_kernel(
    X_ptr,  # [B, C, S] primal input
    XD_ptr,  # [B, C, S] tangent input
    W_ptr,  # [C] gamma
    BIAS_ptr,  # [C] beta
    MASK_ptr,  # [B, C, S] uint8 dropout keep-mask (read only if HAS_MASK)
    STATS_ptr,  # [4, B*G] mean, rstd, mean_dot, rstd_dot from the forward
    GY_ptr,  # [B, C, S] grad of y (read only if HAS_GY)
    GYD_ptr,  # [B, C, S] grad of y_dot (read only if HAS_GYD)
    GX_ptr,  # [B, C, S] out: grad of x
    GXD_ptr,  # [B, C, S] out: grad of x_dot (written only if HAS_GYD)
    DW_ptr,  # [B, C] accumulation dtype, out: per-(sample, channel) partial of grad gamma
    DB_ptr,  # [B, C] accumulation dtype, out: per-(sample, channel) partial of grad beta
    BG,  # B * G
    S,  # spatial size
    G,  # number of groups
    CG,  # channels per group
    SCALE_HI, SCALE_LO,  # dropout scale 1/(1-p) as an fp32 pair
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ONE_TILE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_GY: tl.constexpr,
    HAS_GYD: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid % G
    base = pid.to(tl.int64) * CG * S
    pbase = pid.to(tl.int64) * CG  # = b*C + g*CG in the [B, C] partial-sum buffers
    acc_ty = STATS_ptr.dtype.element_ty
    nf = tl.cast(CG * S, acc_ty)
    scale = tl.cast(SCALE_HI, acc_ty) + tl.cast(SCALE_LO, acc_ty)
    mean = tl.load(STATS_ptr + pid)
    rstd = tl.load(STATS_ptr + BG + pid)
    mean_dot = tl.load(STATS_ptr + 2 * BG + pid)
    rstd_dot = tl.load(STATS_ptr + 3 * BG + pid)

    if ONE_TILE:
        offs_c, offs, mask, w, dd, xh, xhd, g_h, g_hd = _bwd_load_tile(
            X_ptr, XD_ptr, W_ptr, BIAS_ptr, MASK_ptr, GY_ptr, GYD_ptr, base, g, 0, 0, CG, S, scale,
            mean, rstd, mean_dot, rstd_dot, acc_ty, BLOCK_C, BLOCK_S, HAS_MASK, HAS_GY, HAS_GYD)
        cmask = offs_c < CG
        tl.store(DW_ptr + pbase + offs_c, tl.sum(g_h * xh + g_hd * xhd, 1), mask=cmask)
        tl.store(DB_ptr + pbase + offs_c, tl.sum(g_h, 1), mask=cmask)
        a = w * g_h
        ma = tl.sum(a) / nf
        max_ = tl.sum(a * xh) / nf
        mc = ma  # placeholders when the tangent output has no gradient
        mcx = ma
        mcd = ma
        if HAS_GYD:
            c = w * g_hd
            mc = tl.sum(c) / nf
            mcx = tl.sum(c * xh) / nf
            mcd = tl.sum(c * dd) / nf
        gx, gxd = _input_grads(w, g_h, g_hd, xh, dd, rstd, rstd_dot, ma, max_, mc, mcx, mcd, HAS_GYD)
        if HAS_GYD:
            tl.store(GXD_ptr + base + offs, gxd.to(GXD_ptr.dtype.element_ty), mask=mask)
        tl.store(GX_ptr + base + offs, gx.to(GX_ptr.dtype.element_ty), mask=mask)
    else:
        # sweep 1: group reductions and per-channel gamma/beta partials
        acc_a = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
        acc_ax = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
        acc_c = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
        acc_cx = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
        acc_cd = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
        for c0 in range(0, CG, BLOCK_C):
            acc_w = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
            acc_b = tl.zeros([BLOCK_C, BLOCK_S], acc_ty)
            for s0 in range(0, S, BLOCK_S):
                offs_c, offs, mask, w, dd, xh, xhd, g_h, g_hd = _bwd_load_tile(
                    X_ptr, XD_ptr, W_ptr, BIAS_ptr, MASK_ptr, GY_ptr, GYD_ptr, base, g, c0, s0, CG, S, scale,
                    mean, rstd, mean_dot, rstd_dot, acc_ty, BLOCK_C, BLOCK_S, HAS_MASK, HAS_GY, HAS_GYD)
                acc_w += g_h * xh + g_hd * xhd
                acc_b += g_h
                a = w * g_h
                acc_a += a
                acc_ax += a * xh
                if HAS_GYD:
                    c = w * g_hd
                    acc_c += c
                    acc_cx += c * xh
                    acc_cd += c * dd
            offs_cc = c0 + tl.arange(0, BLOCK_C)
            cmask = offs_cc < CG
            tl.store(DW_ptr + pbase + offs_cc, tl.sum(acc_w, 1), mask=cmask)
            tl.store(DB_ptr + pbase + offs_cc, tl.sum(acc_b, 1), mask=cmask)
        ma = tl.sum(acc_a) / nf
        max_ = tl.sum(acc_ax) / nf
        mc = tl.sum(acc_c) / nf
        mcx = tl.sum(acc_cx) / nf
        mcd = tl.sum(acc_cd) / nf
        # sweep 2: input gradients
        for c0 in range(0, CG, BLOCK_C):
            for s0 in range(0, S, BLOCK_S):
                offs_c, offs, mask, w, dd, xh, xhd, g_h, g_hd = _bwd_load_tile(
                    X_ptr, XD_ptr, W_ptr, BIAS_ptr, MASK_ptr, GY_ptr, GYD_ptr, base, g, c0, s0, CG, S, scale,
                    mean, rstd, mean_dot, rstd_dot, acc_ty, BLOCK_C, BLOCK_S, HAS_MASK, HAS_GY, HAS_GYD)
                gx, gxd = _input_grads(w, g_h, g_hd, xh, dd, rstd, rstd_dot, ma, max_, mc, mcx, mcd, HAS_GYD)
                if HAS_GYD:
                    tl.store(GXD_ptr + base + offs, gxd.to(GXD_ptr.dtype.element_ty), mask=mask)
                tl.store(GX_ptr + base + offs, gx.to(GX_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _split_fp32(v: float) -> tuple[float, float]:
    """v ~= hi + lo with hi, lo exactly representable in fp32 (Triton passes float args as fp32)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    lo = struct.unpack("f", struct.pack("f", v - hi))[0]
    return hi, lo


def _pick_config(cg: int, s: int, max_tile: int, elems_per_thread: int,
                 block_c: int | None, block_s: int | None):
    """(BLOCK_C, BLOCK_S, ONE_TILE, num_warps) for a [cg, s] group, tiles of at most max_tile elements."""
    bs = block_s or min(triton.next_power_of_2(s), max_tile)
    bc = block_c or min(triton.next_power_of_2(cg), max(1, max_tile // bs))
    one_tile = bc >= cg and bs >= s
    num_warps = max(1, min(16, triton.next_power_of_2(max(1, (bc * bs) // (32 * elems_per_thread)))))
    return bc, bs, one_tile, num_warps


def _affine_or_default(t: torch.Tensor | None, c: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    if t is None:
        return torch.full((c,), fill, dtype=_acc_dtype(like.dtype), device=like.device)
    return t.contiguous()


def _mask_arg(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return x  # never read (HAS_MASK=False); any pointer will do
    return mask.contiguous().view(torch.uint8)


def groupnorm_silu_dual_fwd(
    x: torch.Tensor,
    x_dot: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
    mask: torch.Tensor | None = None,
    drop_scale: float = 1.0,
    out: torch.Tensor | None = None,
    block_c: int | None = None,
    block_s: int | None = None,
):
    """Dual GroupNorm -> SiLU (-> dropout) forward.

    Args:
        x, x_dot: [B, C, *spatial], same dtype (fp16/bf16/fp32/fp64), same device.
        weight, bias: [C] or None (1 / 0).
        mask: optional [B, C, *spatial] bool dropout keep-mask, shared by both streams, applied as
            ``y * mask * drop_scale``.
        out: optional [2B, C, *spatial] buffer (x's dtype): primal written to ``out[:B]``, tangent to
            ``out[B:]`` (the stacked layout a following convolution consumes in one call).
        block_c, block_s: tile overrides (tests / tuning); powers of two.

    Returns:
        (y, y_dot, stats): y, y_dot [B, C, *spatial] in x's dtype (views of ``out`` if given);
        stats [4, B, G] in fp32 (fp64 for fp64 input): mean, rstd, mean_dot, rstd_dot.
    """
    B, C = x.shape[0], x.shape[1]
    G = num_groups
    CG = C // G
    S = math.prod(x.shape[2:])
    xc = x.contiguous()
    xdc = x_dot.contiguous()
    if out is None:
        y = torch.empty_like(xc)
        yd = torch.empty_like(xc)
    else:
        y, yd = out[:B], out[B:]
        assert y.is_contiguous() and yd.is_contiguous() and y.shape == x.shape
    stats = torch.empty((4, B, G), dtype=_acc_dtype(x.dtype), device=x.device)
    if x.numel() == 0:
        return y, yd, stats
    w = _affine_or_default(weight, C, 1.0, x)
    b = _affine_or_default(bias, C, 0.0, x)
    bc, bs, one_tile, num_warps = _pick_config(CG, S, FWD_MAX_TILE, FWD_ELEMS_PER_THREAD, block_c, block_s)
    eps_hi, eps_lo = _split_fp32(eps)
    sc_hi, sc_lo = _split_fp32(drop_scale)
    # wrap_triton: inside the triton ops of sgflow.ops this launch is visible to torch.compile.
    wrap_triton(_groupnorm_silu_dual_fwd_kernel)[(B * G,)](
        xc, xdc, w, b, _mask_arg(mask, xc), y, yd, stats,
        B * G, S, G, CG, eps_hi, eps_lo, sc_hi, sc_lo,
        BLOCK_C=bc, BLOCK_S=bs, ONE_TILE=one_tile, HAS_MASK=mask is not None,
        num_warps=num_warps,
    )
    return y, yd, stats


def groupnorm_silu_dual_bwd(
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
    block_c: int | None = None,
    block_s: int | None = None,
):
    """Dual GroupNorm -> SiLU (-> dropout) backward (explicit formulas, see module docstring).

    Args:
        x, x_dot, weight, bias, mask, drop_scale: as given to the forward.
        stats: [4, B, G] from :func:`groupnorm_silu_dual_fwd`.
        g_y, g_ydot: [B, C, *spatial] gradients of y and y_dot, either may be None (e.g. the two
            halves of a stacked [2B, ...] convolution input-gradient).

    Returns:
        (g_x, g_xdot, g_weight, g_bias): g_x [B, C, *spatial] in x's dtype, g_xdot likewise or None
        when g_ydot is None, g_weight / g_bias [C] in fp32 (fp64 for fp64 input), reduced from the
        per-(sample, channel) partial sums; the caller casts them and drops them for absent params.
    """
    B, C = x.shape[0], x.shape[1]
    G = num_groups
    CG = C // G
    S = math.prod(x.shape[2:])
    acc = _acc_dtype(x.dtype)
    xc = x.contiguous()
    xdc = x_dot.contiguous()
    gx = torch.empty_like(xc)
    has_gy, has_gyd = g_y is not None, g_ydot is not None
    gxd = torch.empty_like(xc) if has_gyd else None
    if x.numel() == 0 or not (has_gy or has_gyd):
        z = torch.zeros(C, dtype=acc, device=x.device)
        return gx.zero_(), (gxd.zero_() if has_gyd else None), z, z.clone()
    dw = torch.empty((B, C), dtype=acc, device=x.device)
    db = torch.empty((B, C), dtype=acc, device=x.device)
    w = _affine_or_default(weight, C, 1.0, x)
    b = _affine_or_default(bias, C, 0.0, x)
    max_tile = BWD_MAX_TILE_FP64 if x.dtype == torch.float64 else BWD_MAX_TILE
    bc, bs, one_tile, num_warps = _pick_config(CG, S, max_tile, BWD_ELEMS_PER_THREAD, block_c, block_s)
    sc_hi, sc_lo = _split_fp32(drop_scale)
    wrap_triton(_groupnorm_silu_dual_bwd_kernel)[(B * G,)](
        xc, xdc, w, b, _mask_arg(mask, xc), stats.contiguous(),
        g_y.contiguous() if has_gy else xc,
        g_ydot.contiguous() if has_gyd else xc,
        gx, gxd if has_gyd else gx, dw, db,
        B * G, S, G, CG, sc_hi, sc_lo,
        BLOCK_C=bc, BLOCK_S=bs, ONE_TILE=one_tile, HAS_MASK=mask is not None,
        HAS_GY=has_gy, HAS_GYD=has_gyd,
        num_warps=num_warps,
    )
    return gx, gxd, dw.sum(0), db.sum(0)
