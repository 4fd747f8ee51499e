r"""Triton kernels for dual (primal + tangent) softmax attention, flash style (no N x N buffer).

Formulas and the backward derivation are in ``sgflow.ops.attention``'s module docstring. Layout:
every tensor is made contiguous and viewed as ``[B*H, N, D]``; ``lse``, ``mu`` and the backward row
scalars ``alpha``, ``delta`` are ``[B*H, Nq]`` in the accumulation dtype (fp64 for fp64 inputs,
fp32 otherwise).

Kernels
-------
* ``_attention_dual_fwd_kernel``: one program per (query block, batch*head); loops over key blocks
  with an online softmax and three accumulators (``sum p v``, ``sum p (Sd v + vd)``, ``sum p Sd``).
* ``_attention_dual_bwd_preprocess_kernel``: ``alpha_i = gd_i . o_i``, ``delta_i = g_i . o_i +
  gd_i . od_i``.
* ``_attention_dual_bwd_dkv_kernel``: one program per key block; loops over query blocks and
  accumulates ``dk, dv, dk_dot, dv_dot``.
* ``_attention_dual_bwd_dq_kernel``: one program per query block; loops over key blocks and
  accumulates ``dq, dq_dot``. Splitting the two avoids atomics (deterministic results).

Head dims need not be powers of two (tiles are padded to the next power of two >= 16 and masked).
fp32 dots use ``input_precision="tf32x3"`` by default (fp32-level accuracy on tensor cores);
``SGFLOW_ATTENTION_FP32_PRECISION=ieee|tf32`` overrides it. fp16/bf16 inputs use fp32 accumulation
(P and dS are rounded to the input dtype only as dot operands, as in flash-attention).
Tiles: ``triton.autotune`` over the shipped candidates (``_HALF_CONFIGS``, ``_FP32_CONFIGS``), pruned
per call to the offline default; ``SGFLOW_ATTENTION_AUTOTUNE=1`` times every candidate on the GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from sgflow_kernels._env import interpreting
from sgflow_kernels.dtypes import acc_dtype

try:  # the exception type moved around between Triton releases
    from triton.runtime.errors import OutOfResources
except Exception:  # pragma: no cover
    OutOfResources = RuntimeError

__all__ = ["attention_dual_fwd", "attention_dual_bwd"]


# --------------------------------------------------------------------------------------------------
# Kernels (the three tiled ones are wrapped in ``triton.autotune`` under Launchers, next to their tables)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attention_dual_fwd_kernel(
    Q_ptr,  # [BH, N_Q, D]
    K_ptr,  # [BH, N_K, D]
    V_ptr,  # [BH, N_K, DV]
    Qd_ptr,  # [BH, N_Q, D]
    Kd_ptr,  # [BH, N_K, D]
    Vd_ptr,  # [BH, N_K, DV]
    O_ptr,  # [BH, N_Q, DV] out
    Od_ptr,  # [BH, N_Q, DV] out
    Lse_ptr,  # [BH, N_Q] out, ACC_DTYPE
    Mu_ptr,  # [BH, N_Q] out, ACC_DTYPE
    Scale_ptr,  # [1], ACC_DTYPE (a float kernel argument would be rounded to fp32)
    N_Q,  # int: query length
    N_K,  # int: key length
    D,  # int: q/k head dim
    DV,  # int: v head dim
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < N_Q
    d_mask = offs_d < D
    dv_mask = offs_dv < DV

    q_offs = bh * N_Q * D + offs_m[:, None] * D + offs_d[None, :]
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q_ptr + q_offs, mask=q_mask, other=0.0)
    qd = tl.load(Qd_ptr + q_offs, mask=q_mask, other=0.0)
    scale = tl.load(Scale_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc_mu = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)
    # The tangent's row-constant part (e.g. q_dot . k_mean for keys with a non-zero mean) cancels in
    # P (Sd - mu); rounding P Sd to the input dtype before that cancellation loses it (fp16: error x1.9
    # at key mean 3). So acc_t holds sum_j p_j (Sd_j - c) v_j + p_j vd_j with c the running estimate of
    # mu, re-centred (in ACC_DTYPE, through acc = sum_j p_j v_j) whenever c moves; at the end c = mu.
    c_i = tl.zeros([BLOCK_M], ACC_DTYPE)

    k_base = bh * N_K * D
    v_base = bh * N_K * DV
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < N_K
        k_offs = k_base + cols[:, None] * D + offs_d[None, :]
        k_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K_ptr + k_offs, mask=k_mask, other=0.0)
        kd = tl.load(Kd_ptr + k_offs, mask=k_mask, other=0.0)
        v_offs = v_base + cols[:, None] * DV + offs_dv[None, :]
        v_mask = n_mask[:, None] & dv_mask[None, :]
        v = tl.load(V_ptr + v_offs, mask=v_mask, other=0.0)
        vd = tl.load(Vd_ptr + v_offs, mask=v_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        sd = (
            tl.dot(qd, tl.trans(k), input_precision=DOT_PRECISION)
            + tl.dot(q, tl.trans(kd), input_precision=DOT_PRECISION)
        ) * scale
        # Every key block holds >= 1 valid key, so m_new is finite and exp(-inf - m_new) = 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        corr = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, 1)
        acc_mu = acc_mu * corr + tl.sum(p * sd, 1)
        c_new = acc_mu / l_i
        acc = acc * corr[:, None]
        acc_t = (
            acc_t * corr[:, None]
            - (c_new - c_i)[:, None] * acc
            + tl.dot((p * (sd - c_new[:, None])).to(v.dtype), v, input_precision=DOT_PRECISION)
            + tl.dot(p.to(vd.dtype), vd, input_precision=DOT_PRECISION)
        )
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        c_i = c_new
        m_i = m_new

    o = acc / l_i[:, None]
    mu = c_i  # = acc_mu / l_i after the last block
    # Od = sum_j P_j (Sd_j - mu) v_j + P_j vd_j = acc_t / l, since c = mu now
    od = acc_t / l_i[:, None]
    o_offs = bh * N_Q * DV + offs_m[:, None] * DV + offs_dv[None, :]
    o_mask = m_mask[:, None] & dv_mask[None, :]
    tl.store(O_ptr + o_offs, o.to(O_ptr.dtype.element_ty), mask=o_mask)
    tl.store(Od_ptr + o_offs, od.to(Od_ptr.dtype.element_ty), mask=o_mask)
    tl.store(Lse_ptr + bh * N_Q + offs_m, m_i + tl.log(l_i), mask=m_mask)
    tl.store(Mu_ptr + bh * N_Q + offs_m, mu, mask=m_mask)


@triton.jit
def _attention_dual_bwd_preprocess_kernel(
    O_ptr,  # [BH, N_Q, DV]
    Od_ptr,  # [BH, N_Q, DV]
    G_ptr,  # [BH, N_Q, DV] grad of O (unused unless HAS_G)
    Gd_ptr,  # [BH, N_Q, DV] grad of O_dot (unused unless HAS_GD)
    Alpha_ptr,  # [BH, N_Q] out, ACC_DTYPE: gd . o
    Delta_ptr,  # [BH, N_Q] out, ACC_DTYPE: g . o + gd . od
    N_Q,  # int
    DV,  # int
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < N_Q
    offs = bh * N_Q * DV + offs_m[:, None] * DV + offs_dv[None, :]
    mask = m_mask[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(O_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    delta = tl.zeros([BLOCK_M], ACC_DTYPE)
    alpha = tl.zeros([BLOCK_M], ACC_DTYPE)
    if HAS_G:
        g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        delta += tl.sum(g * o, 1)
    if HAS_GD:
        gd = tl.load(Gd_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        od = tl.load(Od_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        alpha += tl.sum(gd * o, 1)
        delta += tl.sum(gd * od, 1)
    tl.store(Alpha_ptr + bh * N_Q + offs_m, alpha, mask=m_mask)
    tl.store(Delta_ptr + bh * N_Q + offs_m, delta, mask=m_mask)


@triton.jit
def _bwd_tile_scores(q, k, v, qd, kd, vd, g, gd, lse, delta, mu, alpha, m_mask, n_mask, scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_G: tl.constexpr, HAS_GD: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Recompute one [BLOCK_M, BLOCK_N] tile of the backward (module docstring): returns (P, T, C, A) with
    dS = P T, C = S_dot - mu, A = Gd V^T - alpha and dS_dot = P A (C and A only meaningful with HAS_GD)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    p = tl.exp(s - lse[:, None])
    p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
    t = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE) - delta[:, None]  # dP' - delta
    c = t  # placeholders when the tangent output has no cotangent
    a = t
    if HAS_G:
        t += tl.dot(g, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_GD:
        c = (
            tl.dot(qd, tl.trans(k), input_precision=DOT_PRECISION)
            + tl.dot(q, tl.trans(kd), input_precision=DOT_PRECISION)
        ) * scale - mu[:, None]  # Sd - mu
        a = tl.dot(gd, tl.trans(v), input_precision=DOT_PRECISION) - alpha[:, None]  # A - alpha
        t += tl.dot(gd, tl.trans(vd), input_precision=DOT_PRECISION) + a * c
    return p, t, c, a


@triton.jit
def _attention_dual_bwd_dkv_kernel(
    Q_ptr,  # [BH, N_Q, D]
    K_ptr,  # [BH, N_K, D]
    V_ptr,  # [BH, N_K, DV]
    Qd_ptr,  # [BH, N_Q, D]
    Kd_ptr,  # [BH, N_K, D]
    Vd_ptr,  # [BH, N_K, DV]
    G_ptr,  # [BH, N_Q, DV] (read iff HAS_G)
    Gd_ptr,  # [BH, N_Q, DV] (read iff HAS_GD)
    Lse_ptr,  # [BH, N_Q] ACC_DTYPE
    Mu_ptr,  # [BH, N_Q] ACC_DTYPE
    Alpha_ptr,  # [BH, N_Q] ACC_DTYPE
    Delta_ptr,  # [BH, N_Q] ACC_DTYPE
    Scale_ptr,  # [1] ACC_DTYPE
    dK_ptr,  # [BH, N_K, D] out
    dV_ptr,  # [BH, N_K, DV] out
    dKd_ptr,  # [BH, N_K, D] out (written iff HAS_GD)
    dVd_ptr,  # [BH, N_K, DV] out (written iff HAS_GD)
    N_Q,  # int
    N_K,  # int
    D,  # int
    DV,  # int
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_mask = cols < N_K
    d_mask = offs_d < D
    dv_mask = offs_dv < DV

    k_offs = bh * N_K * D + cols[:, None] * D + offs_d[None, :]
    k_mask = n_mask[:, None] & d_mask[None, :]
    v_offs = bh * N_K * DV + cols[:, None] * DV + offs_dv[None, :]
    v_mask = n_mask[:, None] & dv_mask[None, :]
    k = tl.load(K_ptr + k_offs, mask=k_mask, other=0.0)
    v = tl.load(V_ptr + v_offs, mask=v_mask, other=0.0)
    kd = k  # placeholders when the tangent output has no cotangent
    vd = v
    if HAS_GD:
        kd = tl.load(Kd_ptr + k_offs, mask=k_mask, other=0.0)
        vd = tl.load(Vd_ptr + v_offs, mask=v_mask, other=0.0)
    scale = tl.load(Scale_ptr)

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC_DTYPE)
    dkd = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dvd = tl.zeros([BLOCK_N, BLOCK_DV], ACC_DTYPE)

    q_base = bh * N_Q * D
    g_base = bh * N_Q * DV
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + offs_m
        m_mask = rows < N_Q
        q_offs = q_base + rows[:, None] * D + offs_d[None, :]
        q_mask = m_mask[:, None] & d_mask[None, :]
        g_offs = g_base + rows[:, None] * DV + offs_dv[None, :]
        g_mask = m_mask[:, None] & dv_mask[None, :]
        q = tl.load(Q_ptr + q_offs, mask=q_mask, other=0.0)
        # +inf makes exp(s - lse) vanish on padded rows without overflow.
        lse = tl.load(Lse_ptr + bh * N_Q + rows, mask=m_mask, other=float("inf"))
        delta = tl.load(Delta_ptr + bh * N_Q + rows, mask=m_mask, other=0.0)
        g = q  # placeholders for streams without a cotangent
        qd = q
        gd = q
        mu = lse
        alpha = lse
        if HAS_G:
            g = tl.load(G_ptr + g_offs, mask=g_mask, other=0.0)
        if HAS_GD:
            qd = tl.load(Qd_ptr + q_offs, mask=q_mask, other=0.0)
            gd = tl.load(Gd_ptr + g_offs, mask=g_mask, other=0.0)
            mu = tl.load(Mu_ptr + bh * N_Q + rows, mask=m_mask, other=0.0)
            alpha = tl.load(Alpha_ptr + bh * N_Q + rows, mask=m_mask, other=0.0)
        p, t, c, a = _bwd_tile_scores(q, k, v, qd, kd, vd, g, gd, lse, delta, mu, alpha, m_mask, n_mask, scale,
                                      BLOCK_M, BLOCK_N, HAS_G, HAS_GD, ACC_DTYPE, DOT_PRECISION)
        if HAS_G:
            dv += tl.dot(tl.trans(p.to(g.dtype)), g, input_precision=DOT_PRECISION)
        if HAS_GD:
            dsd = p * a
            dv += tl.dot(tl.trans((p * c).to(gd.dtype)), gd, input_precision=DOT_PRECISION)
            dvd += tl.dot(tl.trans(p.to(gd.dtype)), gd, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(dsd.to(qd.dtype)), qd, input_precision=DOT_PRECISION)
            dkd += tl.dot(tl.trans(dsd.to(q.dtype)), q, input_precision=DOT_PRECISION)
        ds = p * t
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    tl.store(dK_ptr + k_offs, (dk * scale).to(dK_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dV_ptr + v_offs, dv.to(dV_ptr.dtype.element_ty), mask=v_mask)
    if HAS_GD:
        tl.store(dKd_ptr + k_offs, (dkd * scale).to(dKd_ptr.dtype.element_ty), mask=k_mask)
        tl.store(dVd_ptr + v_offs, dvd.to(dVd_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def _attention_dual_bwd_dq_kernel(
    Q_ptr,  # [BH, N_Q, D]
    K_ptr,  # [BH, N_K, D]
    V_ptr,  # [BH, N_K, DV]
    Qd_ptr,  # [BH, N_Q, D]
    Kd_ptr,  # [BH, N_K, D]
    Vd_ptr,  # [BH, N_K, DV]
    G_ptr,  # [BH, N_Q, DV] (read iff HAS_G)
    Gd_ptr,  # [BH, N_Q, DV] (read iff HAS_GD)
    Lse_ptr,  # [BH, N_Q] ACC_DTYPE
    Mu_ptr,  # [BH, N_Q] ACC_DTYPE
    Alpha_ptr,  # [BH, N_Q] ACC_DTYPE
    Delta_ptr,  # [BH, N_Q] ACC_DTYPE
    Scale_ptr,  # [1] ACC_DTYPE
    dQ_ptr,  # [BH, N_Q, D] out
    dQd_ptr,  # [BH, N_Q, D] out (written iff HAS_GD)
    N_Q,  # int
    N_K,  # int
    D,  # int
    DV,  # int
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = rows < N_Q
    d_mask = offs_d < D
    dv_mask = offs_dv < DV

    q_offs = bh * N_Q * D + rows[:, None] * D + offs_d[None, :]
    q_mask = m_mask[:, None] & d_mask[None, :]
    g_offs = bh * N_Q * DV + rows[:, None] * DV + offs_dv[None, :]
    g_mask = m_mask[:, None] & dv_mask[None, :]
    q = tl.load(Q_ptr + q_offs, mask=q_mask, other=0.0)
    lse = tl.load(Lse_ptr + bh * N_Q + rows, mask=m_mask, other=float("inf"))
    delta = tl.load(Delta_ptr + bh * N_Q + rows, mask=m_mask, other=0.0)
    g = q  # placeholders for streams without a cotangent
    qd = q
    gd = q
    mu = lse
    alpha = lse
    if HAS_G:
        g = tl.load(G_ptr + g_offs, mask=g_mask, other=0.0)
    if HAS_GD:
        qd = tl.load(Qd_ptr + q_offs, mask=q_mask, other=0.0)
        gd = tl.load(Gd_ptr + g_offs, mask=g_mask, other=0.0)
        mu = tl.load(Mu_ptr + bh * N_Q + rows, mask=m_mask, other=0.0)
        alpha = tl.load(Alpha_ptr + bh * N_Q + rows, mask=m_mask, other=0.0)
    scale = tl.load(Scale_ptr)

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    dqd = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    k_base = bh * N_K * D
    v_base = bh * N_K * DV
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < N_K
        k_offs = k_base + cols[:, None] * D + offs_d[None, :]
        k_mask = n_mask[:, None] & d_mask[None, :]
        v_offs = v_base + cols[:, None] * DV + offs_dv[None, :]
        v_mask = n_mask[:, None] & dv_mask[None, :]
        k = tl.load(K_ptr + k_offs, mask=k_mask, other=0.0)
        v = tl.load(V_ptr + v_offs, mask=v_mask, other=0.0)
        kd = k
        vd = v
        if HAS_GD:
            kd = tl.load(Kd_ptr + k_offs, mask=k_mask, other=0.0)
            vd = tl.load(Vd_ptr + v_offs, mask=v_mask, other=0.0)
        p, t, c, a = _bwd_tile_scores(q, k, v, qd, kd, vd, g, gd, lse, delta, mu, alpha, m_mask, n_mask, scale,
                                      BLOCK_M, BLOCK_N, HAS_G, HAS_GD, ACC_DTYPE, DOT_PRECISION)
        if HAS_GD:
            dsd = (p * a).to(k.dtype)
            dq += tl.dot(dsd, kd, input_precision=DOT_PRECISION)
            dqd += tl.dot(dsd, k, input_precision=DOT_PRECISION)
        ds = p * t
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    tl.store(dQ_ptr + q_offs, (dq * scale).to(dQ_ptr.dtype.element_ty), mask=q_mask)
    if HAS_GD:
        tl.store(dQd_ptr + q_offs, (dqd * scale).to(dQd_ptr.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return interpreting()


def _acc_dtypes(dtype: torch.dtype):
    """(Triton, torch) accumulation dtypes."""
    acc = acc_dtype(dtype)
    return (tl.float64 if acc == torch.float64 else tl.float32), acc


def _dot_precision(dtype: torch.dtype) -> str:
    # Only fp32 operands read this. "tf32x3" keeps fp32 accuracy (~1e-6) on tensor cores; "ieee"
    # falls back to FMA (exact but slow) and "tf32" trades accuracy (~1e-3) for speed.
    if dtype != torch.float32:
        return "tf32"  # ignored for fp16/bf16/fp64; the value every Triton release accepts
    choice = os.environ.get("SGFLOW_ATTENTION_FP32_PRECISION", "tf32x3").lower()
    if choice not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"SGFLOW_ATTENTION_FP32_PRECISION must be ieee|tf32|tf32x3, got {choice!r}")
    return choice


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim bucket, default first.
# Chosen offline for sm_90 by compiling every candidate and minimising ptxas register spills at
# sensible tile sizes (no GPU timings yet: set SGFLOW_ATTENTION_AUTOTUNE=1 to time them on the
# device). The dual kernels keep about twice flash-attention's live tiles, hence the small tiles.
_HALF_CONFIGS = {
    "fwd": {
        64: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
        128: [(64, 32, 8, 2), (32, 32, 8, 1), (64, 64, 8, 2), (32, 32, 4, 1)],
        256: [(32, 32, 8, 1), (16, 32, 4, 1), (64, 32, 8, 2)],
    },
    "bwd_dkv": {
        64: [(32, 32, 8, 1), (16, 64, 8, 1), (64, 32, 8, 2), (32, 64, 8, 2)],
        128: [(32, 32, 8, 1), (16, 32, 4, 1), (16, 64, 8, 1)],
        256: [(16, 64, 8, 1), (16, 32, 8, 1), (16, 32, 4, 1)],
    },
    "bwd_dq": {
        64: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 1), (16, 64, 8, 1)],
        128: [(32, 32, 8, 1), (16, 64, 8, 1), (16, 32, 4, 1)],
        256: [(16, 32, 4, 1), (32, 32, 8, 1), (16, 32, 8, 1)],
    },
}
_FP32_CONFIGS = {  # also used for fp64
    "fwd": {
        64: [(32, 32, 8, 1), (16, 64, 8, 1), (64, 32, 8, 2)],
        128: [(16, 64, 8, 1), (16, 32, 4, 1), (32, 32, 8, 1)],
        256: [(16, 32, 4, 1), (16, 32, 8, 1)],
    },
    # Backward defaults: the tiles with the fewest register spills in benchmarks/compile_check_sm90.py-style
    # offline compiles for sm_90 (e.g. dK/dV at D=64: 16x16/8 warps 0 B against 1316 B for 16x32/4);
    # untimed so far, SGFLOW_ATTENTION_AUTOTUNE=1 times the candidates on a GPU.
    "bwd_dkv": {
        64: [(16, 16, 8, 1), (16, 32, 8, 1), (16, 32, 4, 1)],
        128: [(16, 16, 8, 1), (16, 32, 8, 1), (16, 32, 4, 1)],
        256: [(16, 16, 4, 1), (16, 32, 4, 1)],
    },
    "bwd_dq": {
        64: [(16, 32, 8, 1), (16, 64, 8, 1), (16, 32, 4, 1)],
        128: [(16, 16, 8, 1), (16, 32, 8, 1), (16, 32, 4, 1)],
        256: [(16, 16, 4, 1), (16, 32, 8, 1)],
    },
}
_LAST_RESORT = (16, 16, 4, 1)
# Under the interpreter (programs run one by one) small tiles still exercise the multi-block loops.
_INTERPRETER_CONFIG = (16, 16, 1, 1)


def _candidates(kind: str, block_d: int, block_dv: int, dtype: torch.dtype):
    """Shipped (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of one kernel kind for a GPU launch,
    default (offline choice) first: the table of the dtype, bucketed by the padded head dims."""
    table = _HALF_CONFIGS if dtype in (torch.float16, torch.bfloat16) else _FP32_CONFIGS
    width = max(block_d, block_dv)
    bucket = 64 if width <= 64 else 128 if width <= 128 else 256
    cands = list(table[kind][bucket])
    if width > 256 or _LAST_RESORT not in cands:
        cands.append(_LAST_RESORT)
    return cands


def _autotuning() -> bool:
    return os.environ.get("SGFLOW_ATTENTION_AUTOTUNE", "0") not in ("", "0")


# Tile choice is triton.autotune's (below): every kernel kind lists the union of its shipped candidates
# (+ the interpreter's config), and ``early_config_prune`` keeps, per call:
#   * under the interpreter: _INTERPRETER_CONFIG;
#   * _FORCED_CONFIGS[kind] when set (tests: run one given config, no fallback);
#   * by default: the first candidate of the call's (dtype table, head-dim bucket) that has not been
#     rejected for resources, so nothing is benchmarked;
#   * with SGFLOW_ATTENTION_AUTOTUNE=1 (read at call time): every candidate, which the Autotuner then
#     times once per key (its benchmarking counts OutOfResources as an infinite time). Every kernel
#     overwrites its outputs and never writes its inputs, so no reset_to_zero / restore_value is needed.
# The Autotuner caches its choice per key (the shape arguments below plus the tensor dtypes it appends
# itself); the prune's other inputs (the env vars, _FORCED_CONFIGS, _REJECTED) are not in that key, so
# the launchers clear the caches whenever one of them changes (_sync_tuning_state, _launch_tuned).
_FORCED_CONFIGS: dict = {}  # kind -> (BLOCK_M, BLOCK_N, num_warps, num_stages)
_REJECTED: set = set()  # ((kind, dtype, BLOCK_D, BLOCK_DV, HAS_G, HAS_GD, DOT_PRECISION), config)
_tuning_state = None


def _variant(kind, dtype, meta):
    """What a config's resource use depends on (besides the config): the key of _REJECTED."""
    return (kind, str(dtype), meta["BLOCK_D"], meta["BLOCK_DV"], meta.get("HAS_G"), meta.get("HAS_GD"),
            meta["DOT_PRECISION"])


def _selected(kind, dtype, meta):
    """The candidates the Autotuner keeps for one call, as tuples (see the comment above)."""
    if _interpreting():
        return [_INTERPRETER_CONFIG]
    if kind in _FORCED_CONFIGS:
        return [_FORCED_CONFIGS[kind]]
    cands = _candidates(kind, meta["BLOCK_D"], meta["BLOCK_DV"], dtype)
    variant = _variant(kind, dtype, meta)
    live = [c for c in cands if (variant, c) not in _REJECTED]
    if not live:  # everything was rejected: _launch_tuned re-raises on the last one
        return cands[-1:]
    return live if _autotuning() else live[:1]


def _as_tuple(cfg):
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def _tile_configs(kind):
    """Every config the Autotuner of ``kind`` may pick: the union of the shipped tables (+ interpreter)."""
    tuples = [_INTERPRETER_CONFIG, _LAST_RESORT]
    for table in (_HALF_CONFIGS, _FP32_CONFIGS):
        for cands in table[kind].values():
            tuples += cands
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in dict.fromkeys(tuples)]


def _early_config_prune(kind):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        by_tuple = {_as_tuple(c): c for c in configs}
        return [by_tuple[t] for t in _selected(kind, args["Q_ptr"].dtype, args)]

    return prune


# N_Q and N_K are in the key so that SGFLOW_ATTENTION_AUTOTUNE=1 times per sequence length (by default a
# new key only costs the prune); Triton appends the tensor arguments' dtypes to the key itself.
_SHAPE_KEY = ["N_Q", "N_K", "BLOCK_D", "BLOCK_DV", "DOT_PRECISION"]


def _autotune(kind, key):
    return triton.autotune(configs=_tile_configs(kind), key=key,
                           prune_configs_by={"early_config_prune": _early_config_prune(kind)})


_attention_dual_fwd_kernel = _autotune("fwd", _SHAPE_KEY)(_attention_dual_fwd_kernel)
_attention_dual_bwd_dkv_kernel = _autotune("bwd_dkv", _SHAPE_KEY + ["HAS_G", "HAS_GD"])(
    _attention_dual_bwd_dkv_kernel)
_attention_dual_bwd_dq_kernel = _autotune("bwd_dq", _SHAPE_KEY + ["HAS_G", "HAS_GD"])(
    _attention_dual_bwd_dq_kernel)
_TUNED = {"fwd": _attention_dual_fwd_kernel, "bwd_dkv": _attention_dual_bwd_dkv_kernel,
          "bwd_dq": _attention_dual_bwd_dq_kernel}


def _sync_tuning_state():
    global _tuning_state
    state = (_interpreting(), _autotuning(), tuple(sorted(_FORCED_CONFIGS.items())))
    if state != _tuning_state:
        for tuner in _TUNED.values():
            tuner.cache.clear()
        _tuning_state = state


def _launch_tuned(kind, grid, args, meta, dtype, block_m=None, block_n=None):
    """Launch kernel ``kind`` on ``grid`` (a function of the config's meta-parameters).

    ``block_m``/``block_n`` (tests) bypass the Autotuner: its JITFunction (``.fn``) runs with those tiles
    and the default candidate's warps/stages. Otherwise the Autotuner picks the config (see above). In the
    default (untimed) mode a pick that does not fit the GPU (OutOfResources when compiled) is added to
    _REJECTED and the launch retried, so the prune moves on to the next candidate; under torch.compile
    the config is chosen at trace time and compiled by inductor, without this fallback.
    """
    tuner = _TUNED[kind]
    if block_m is not None or block_n is not None:
        bm, bn, warps, stages = _INTERPRETER_CONFIG if _interpreting() else _candidates(
            kind, meta["BLOCK_D"], meta["BLOCK_DV"], dtype)[0]
        wrap_triton(tuner.fn)[grid](*args, **meta, BLOCK_M=block_m or bm, BLOCK_N=block_n or bn,
                                    num_warps=warps, num_stages=stages)
        return
    _sync_tuning_state()
    while True:
        try:
            wrap_triton(tuner)[grid](*args, **meta)
            return
        except OutOfResources:  # pragma: no cover - GPU only
            if _autotuning() or kind in _FORCED_CONFIGS:
                raise
            rejected = (_variant(kind, dtype, meta), _as_tuple(tuner.best_config))
            if rejected in _REJECTED:  # no candidate left
                raise
            _REJECTED.add(rejected)
            tuner.cache.clear()  # it holds the rejected pick


def _as_bhnd(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.contiguous().view(b * h, n, d)


def _check(q, k, v):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"attention_dual triton backend: unsupported dtype {q.dtype}")
    if not q.is_cuda and not _interpreting():
        raise RuntimeError("attention_dual triton backend needs CUDA tensors or TRITON_INTERPRET=1")


def attention_dual_fwd(q, k, v, q_dot, k_dot, v_dot, scale, block_m=None, block_n=None):
    """Flash-style dual attention forward.

    Args:
        q, q_dot: [B, H, Nq, D]; k, k_dot: [B, H, Nk, D]; v, v_dot: [B, H, Nk, Dv]; scale: float.
        block_m, block_n: optional tile sizes (powers of two >= 16), mostly for tests.

    Returns:
        ``(o, o_dot, lse, mu)``: o, o_dot [B, H, Nq, Dv] in the input dtype; lse, mu [B, H, Nq] in
        fp32 (fp64 for fp64 inputs): ``lse_i = log sum_j exp(S_ij)``, ``mu_i = sum_j P_ij Sd_ij``.
    """
    _check(q, k, v)
    b, h, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[3]
    acc_tl, acc_torch = _acc_dtypes(q.dtype)
    qf, kf, vf, qdf, kdf, vdf = (_as_bhnd(t) for t in (q, k, v, q_dot, k_dot, v_dot))
    o = torch.empty((b * h, n_q, dv), device=q.device, dtype=q.dtype)
    o_dot = torch.empty_like(o)
    lse = torch.empty((b * h, n_q), device=q.device, dtype=acc_torch)
    mu = torch.empty_like(lse)
    scale_t = torch.full((1,), scale, device=q.device, dtype=acc_torch)
    block_d, block_dv = _pad_dim(d), _pad_dim(dv)
    meta = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, ACC_DTYPE=acc_tl, DOT_PRECISION=_dot_precision(q.dtype))
    _launch_tuned(
        "fwd", lambda m: (triton.cdiv(n_q, m["BLOCK_M"]), b * h),
        (qf, kf, vf, qdf, kdf, vdf, o, o_dot, lse, mu, scale_t, n_q, n_k, d, dv),
        meta, q.dtype, block_m, block_n,
    )
    return (
        o.view(b, h, n_q, dv),
        o_dot.view(b, h, n_q, dv),
        lse.view(b, h, n_q),
        mu.view(b, h, n_q),
    )


def attention_dual_bwd(
    q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, g_o, g_o_dot, scale, block_m=None, block_n=None
):
    """Backward of dual attention through both outputs (see sgflow.ops.attention for the math).

    Args:
        q, k, v, q_dot, k_dot, v_dot: forward inputs; o, o_dot: [B, H, Nq, Dv] forward outputs;
        lse, mu: [B, H, Nq] forward statistics; g_o, g_o_dot: [B, H, Nq, Dv] or None (not both).

    Returns:
        ``(dq, dk, dv, dq_dot, dk_dot, dv_dot)`` in the input shapes/dtype; the three tangent
        gradients are None when ``g_o_dot`` is None (they are exactly zero then).
    """
    _check(q, k, v)
    if g_o is None and g_o_dot is None:
        raise ValueError("attention_dual_bwd: both output gradients are None")
    b, h, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[3]
    has_g, has_gd = g_o is not None, g_o_dot is not None
    acc_tl, acc_torch = _acc_dtypes(q.dtype)
    qf, kf, vf, qdf, kdf, vdf, of, odf = (
        _as_bhnd(t) for t in (q, k, v, q_dot, k_dot, v_dot, o, o_dot)
    )
    gf = _as_bhnd(g_o.to(q.dtype)) if has_g else None
    gdf = _as_bhnd(g_o_dot.to(q.dtype)) if has_gd else None
    # An unread pointer argument still needs a tensor; any one of the right device will do.
    gf_arg = gf if has_g else gdf
    gdf_arg = gdf if has_gd else gf
    lse_f = lse.contiguous().view(b * h, n_q)
    mu_f = mu.contiguous().view(b * h, n_q)
    alpha = torch.empty_like(lse_f)
    delta = torch.empty_like(lse_f)
    scale_t = torch.full((1,), scale, device=q.device, dtype=acc_torch)
    block_d, block_dv = _pad_dim(d), _pad_dim(dv)
    dot_prec = _dot_precision(q.dtype)

    # Elementwise only: keep four [BLOCK_M, BLOCK_DV] tiles within registers.
    pre_bm = 16 if _interpreting() else max(16, min(64, 4096 // block_dv))
    wrap_triton(_attention_dual_bwd_preprocess_kernel)[(triton.cdiv(n_q, pre_bm), b * h)](
        of, odf, gf_arg, gdf_arg, alpha, delta, n_q, dv,
        BLOCK_M=pre_bm, BLOCK_DV=block_dv, HAS_G=has_g, HAS_GD=has_gd, ACC_DTYPE=acc_tl,
    )

    dq = torch.empty_like(qf)
    dk = torch.empty_like(kf)
    dvv = torch.empty_like(vf)
    dq_dot = torch.empty_like(qf) if has_gd else dq
    dk_dot = torch.empty_like(kf) if has_gd else dk
    dv_dot = torch.empty_like(vf) if has_gd else dvv

    meta = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, HAS_G=has_g, HAS_GD=has_gd, ACC_DTYPE=acc_tl,
                DOT_PRECISION=dot_prec)
    common = (qf, kf, vf, qdf, kdf, vdf, gf_arg, gdf_arg, lse_f, mu_f, alpha, delta, scale_t)
    _launch_tuned(
        "bwd_dkv", lambda m: (triton.cdiv(n_k, m["BLOCK_N"]), b * h),
        (*common, dk, dvv, dk_dot, dv_dot, n_q, n_k, d, dv), meta, q.dtype, block_m, block_n,
    )
    _launch_tuned(
        "bwd_dq", lambda m: (triton.cdiv(n_q, m["BLOCK_M"]), b * h),
        (*common, dq, dq_dot, n_q, n_k, d, dv), meta, q.dtype, block_m, block_n,
    )

    def back(t, n, width):
        return t.view(b, h, n, width)

    grads = (
        back(dq, n_q, d),
        back(dk, n_k, d),
        back(dvv, n_k, dv),
        back(dq_dot, n_q, d) if has_gd else None,
        back(dk_dot, n_k, d) if has_gd else None,
        back(dv_dot, n_k, dv) if has_gd else None,
    )
    return grads
