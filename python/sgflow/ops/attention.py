r"""Dual (primal + tangent) softmax attention with a backward through both outputs.

Shapes: ``q, q_dot: [B, H, Nq, D]``, ``k, k_dot: [B, H, Nk, D]``, ``v, v_dot: [B, H, Nk, Dv]``
(self-attention is ``Nq == Nk``, ``Dv == D``); outputs ``o, o_dot: [B, H, Nq, Dv]``.
Per (batch, head), with ``s`` the softmax scale (default ``D ** -0.5``) and row index i, column j:

Forward
-------
    S    = s Q K^T                                   [Nq, Nk]
    P    = softmax_rows(S),  lse_i = log sum_j exp(S_ij)
    O    = P V
    Sd   = s (Qd K^T + Q Kd^T)                       (tangent of S)
    mu_i = sum_j P_ij Sd_ij                          (P-weighted row mean of Sd)
    Pd   = P * (Sd - mu 1^T)                         (tangent of the softmax)
    Od   = Pd V + P Vd

The flash-style forward never forms P: with running row max m, l = sum_j exp(S_ij - m),
acc = sum_j exp(S_ij - m) v_j, acc_mu = sum_j exp(S_ij - m) Sd_ij (all rescaled when m grows) one
gets O = acc / l and mu = acc_mu / l. The tangent accumulator is centred by the running estimate
c_i = acc_mu / l of mu_i: acc_t = sum_j exp(S_ij - m) ((Sd_ij - c_i) v_j + vd_j), shifted by
-(c_new - c_old) acc whenever c moves, so that after the last block c = mu and Od = acc_t / l.
Centring before the products are rounded to the input dtype keeps the row-constant part of Sd
(e.g. q_dot . k_mean for keys with a non-zero mean), which cancels in Pd, out of the rounding.

Backward (derivation)
---------------------
Let L = <G, O> + <Gd, Od> for cotangents G, Gd of shape [Nq, Dv] (a missing one is zero).
Collect what L sees of P, Pd and Sd:

    L = <G, P V> + <Gd, Pd V> + <Gd, P Vd>.

Value gradients (P and Pd enter linearly):

    dV  = P^T G + Pd^T Gd,        dVd = P^T Gd.

Write A = Gd V^T (so A_ij = gd_i . v_j, the cotangent of Pd) and B = G V^T + Gd Vd^T (the direct
cotangent of P). Then L = <B, P> + <A, Pd> + const, and with Pd_ij = P_ij Sd_ij - P_ij mu_i:

    <A, Pd> = sum_ij A_ij P_ij Sd_ij - sum_i mu_i alpha_i,     alpha_i := sum_j P_ij A_ij = gd_i . o_i.

* Through Sd (P fixed), using d mu_i / d Sd_ij = P_ij:
      dSd_ij = P_ij A_ij - alpha_i P_ij = P_ij (A_ij - alpha_i).
* Through P (Sd fixed), using d mu_i / d P_ij = Sd_ij and d alpha_i / d P_ij = A_ij:
      dP_ij = B_ij + A_ij Sd_ij - alpha_i Sd_ij - mu_i A_ij
            = B_ij + (A_ij - alpha_i)(Sd_ij - mu_i) - alpha_i mu_i.
  A per-row constant in dP is annihilated by the softmax backward (P sums to one), so drop the
  last term and use dP'_ij = B_ij + (A_ij - alpha_i)(Sd_ij - mu_i).
* Softmax backward: dS_ij = P_ij (dP'_ij - delta_i), delta_i = sum_j P_ij dP'_ij. Expanding with
  sum_j P_ij (Sd_ij - mu_i) = 0 (kills the alpha part), sum_j P_ij B_ij = g_i . o_i + gd_i . (P Vd)_i
  and sum_j P_ij A_ij (Sd_ij - mu_i) = gd_i . (Pd V)_i, and using Od = Pd V + P Vd, the row scalar
  collapses to

      delta_i = g_i . o_i + gd_i . od_i,

  the dual analogue of flash-attention's rowsum(dO * O). So

      dS_ij  = P_ij (B_ij + (A_ij - alpha_i)(Sd_ij - mu_i) - delta_i)
      dSd_ij = P_ij (A_ij - alpha_i).

Finally S = s Q K^T and Sd = s (Qd K^T + Q Kd^T) are bilinear:

    dQ  = s (dS K + dSd Kd),      dK  = s (dS^T Q + dSd^T Qd),
    dQd = s dSd K,                dKd = s dSd^T Q.

Everything is a blockwise function of (q_i, qd_i, g_i, gd_i, lse_i, mu_i, alpha_i, delta_i) and
(k_j, kd_j, v_j, vd_j), so the backward only needs the saved inputs, the outputs (for alpha, delta)
and the two per-row statistics lse and mu: O(N) memory per row instead of the O(N^2) of P.
If Gd is missing, A = alpha = dSd = 0 and the tangent inputs get no gradient; if G is missing the
G terms drop out of B and delta.

Module layout (see docs/DESIGN.md): :func:`attention_dual_ref` (explicit formulas, materialises P),
the torch backend (:func:`_torch_forward`, :func:`_torch_backward`, chunked over query rows),
:class:`AttentionDual` and the functional API :func:`attention_dual`. Triton kernels live in
``sgflow_kernels/attention.py``, the C++ CPU kernel (backend ``"cpp"``: the same formulas, one head per thread, a
tile of query rows' score rows in L1) in ``csrc/attention_dual_cpu_kernels.h``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

from sgflow.ops.backend import autocast_dual, resolve_backend
from sgflow.ops.library import once as _once, register_loop_vmap
from sgflow_kernels.dtypes import acc_dtype as _acc_dtype

__all__ = ["attention_dual_ref", "AttentionDual", "attention_dual"]

# Upper bound on the elements of one [B, H, rows, Nk] score block in the torch backend; a handful
# of such temporaries are alive at once, so this caps its memory at a few hundred MB in fp32.
_TORCH_CHUNK_ELEMS = 1 << 24


# --------------------------------------------------------------------------------------------------
# 1. Reference
# --------------------------------------------------------------------------------------------------
def attention_dual_ref(q, k, v, q_dot, k_dot, v_dot, scale=None):
    """Dual attention by the explicit formulas, materialising P (reference; differentiable).

    Args:
        q, q_dot: [B, H, Nq, D]; k, k_dot: [B, H, Nk, D]; v, v_dot: [B, H, Nk, Dv].
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``(o, o_dot)``, each [B, H, Nq, Dv]: ``o = P v`` and
        ``o_dot = P * (Sd - mu) v + P v_dot`` with ``Sd = scale (q_dot k^T + q k_dot^T)``,
        ``mu = rowsum(P * Sd)``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = scale * (q @ k.transpose(-1, -2))
    p = torch.softmax(s, dim=-1)
    s_dot = scale * (q_dot @ k.transpose(-1, -2) + q @ k_dot.transpose(-1, -2))
    mu = (p * s_dot).sum(-1, keepdim=True)
    p_dot = p * (s_dot - mu)
    return p @ v, p_dot @ v + p @ v_dot


# --------------------------------------------------------------------------------------------------
# 2. Torch backend (explicit formulas, query rows processed in chunks)
# --------------------------------------------------------------------------------------------------
# Lower bound on a score block's elements, so small inputs run in one chunk (Python overhead per chunk).
_TORCH_CHUNK_MIN_ELEMS = 1 << 18
# On CPU, at most this many: a block's half-dozen elementwise passes then run on data in cache. One thread,
# 16 x 256 tokens, forward + backward: heads of 32 (4): 113 ms at 2^19-element blocks, 104 at 2^17, 110 at
# 2^16; heads of 8 (16): 280 / 245 / 246 ms; heads of 64 (2): 110 / 96 / 98 ms (benchmarks/NOTES.md).
_TORCH_CPU_CHUNK_ELEMS = 1 << 17


def _chunks(bh: int, n_q: int, n_k: int, q_numel: int, cpu: bool = False) -> list:
    """``(heads, rows)`` slices of the flattened [B*H] and query dims, one score block each.

    A block holds at most as many elements as q itself (and at least 2^18, at most 2^24), so the handful
    of block temporaries alive at once stay linear in the sequence length, like the saved tensors
    (measured: on a DiT at 256 tokens the backward's whole-matrix temporaries set the training step's
    peak). Whole heads per block where one head's [Nq, Nk] scores fit: few large batched matmuls (blocks
    of 32 query rows across all heads made 3x the calls, ~1.5x the time on one CPU thread) and the
    key-side gradients written once instead of accumulated; slices of one head's query rows otherwise."""
    cap = min(_TORCH_CHUNK_ELEMS, max(_TORCH_CHUNK_MIN_ELEMS, q_numel))
    if cpu:
        cap = min(cap, _TORCH_CPU_CHUNK_ELEMS)
    if n_q * n_k <= cap:
        heads = max(1, cap // (n_q * n_k))
        return [(slice(h0, min(bh, h0 + heads)), slice(0, n_q)) for h0 in range(0, bh, heads)]
    rows = max(1, cap // n_k)
    return [(slice(h, h + 1), slice(r0, min(n_q, r0 + rows))) for h in range(bh) for r0 in range(0, n_q, rows)]


def _groups(tensors) -> list:
    """3-D ``[G, N, D]`` views of 4-D ``[B, H, N, D]`` tensors (None passes through), one tuple per group of
    heads: all ``B*H`` at once where every tensor's batch and head dims merge (a view), else one group per
    batch item. No copies: heads split off the channels (``x.view(B, N, H, D).transpose(1, 2)``, the usual
    layout) merge with nothing, and a dense [B*H, N, D] copy of each input cost a fifth of the forward; the
    products read the strided heads directly."""
    try:
        return [tuple(None if t is None else t.view(-1, t.shape[-2], t.shape[-1]) for t in tensors)]
    except RuntimeError:
        b = next(t for t in tensors if t is not None).shape[0]
        return [tuple(None if t is None else t[i] for t in tensors) for i in range(b)]


def _mm_into(dst: torch.Tensor, whole: bool, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``dst = alpha a @ b`` where the blocks hold whole heads (a key-side gradient written once), else
    ``dst += alpha a @ b`` (``dst`` zero-initialised, the row slices of one head accumulating)."""
    dst.baddbmm_(a, b, beta=0.0 if whole else 1.0, alpha=alpha)


def _scores(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale a @ b^T`` ([G, Nq, Nk]) into a new buffer; ``beta=0`` ignores the buffer's contents."""
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1])).baddbmm_(a, b.transpose(1, 2), beta=0.0, alpha=scale)


# Heads at most this wide are paired in the forward (``s [Qd, Q]``, ``[K, Kd]``, ``[V, Vd]``: one dense copy
# each): on CPU a product of inner size 8 costs about what one of 16 does, and ``E [V, Vd]`` reads E once.
# Wider heads are read in place (the copies then cost more than the products save). Forward, one thread,
# heads split off the channels, 16 x 256 tokens, each pair of numbers from one process: 16 heads of 8, in
# place 49.0 ms against 43.4 paired; 8 heads of 16: 29.4 against 29.0; 4 heads of 32: 20.2 against 21.3.
_PAIR_MAX_HEAD_DIM = 16


def _paired(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``scale [a, b]`` along the feature dim as a dense [B, H, N, Da + Db] tensor (written half by half)."""
    da = a.shape[-1]
    out = a.new_empty((*a.shape[:-1], da + b.shape[-1]), dtype=dtype)
    for src, dst in ((a, out[..., :da]), (b, out[..., da:])):
        torch.mul(src, scale, out=dst) if scale != 1.0 else dst.copy_(src)
    return out


def _torch_forward(q, k, v, q_dot, k_dot, v_dot, scale):
    """Torch-backend forward. Returns ``(o, o_dot, lse, mu)``; lse, mu: [B, H, Nq] (fp32/fp64).

    Per block, with E = exp(S - m) (m the row max, l = rowsum E, P = E / l): Sd = s Qd K^T + s Q Kd^T
    (two products into one buffer, or one of the paired operands ``s [Qd, Q] [K, Kd]^T`` for heads of at
    most :data:`_PAIR_MAX_HEAD_DIM`); E Sd once, mu = rowsum(E Sd) / l and E (Sd - mu) in place; o = E V / l,
    od = (E Vd + E (Sd - mu) V) / l. P is never normalised (1/l scales the [Nq, Dv] results instead) and
    lse = m + log l. Wider heads are read in their own layout (:func:`_groups`).
    """
    cdt = _acc_dtype(q.dtype)
    b, h, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[-1]
    o = q.new_empty((b, h, n_q, dv), dtype=cdt)
    o_dot = torch.empty_like(o)
    lse = q.new_empty((b, h, n_q, 1), dtype=cdt)
    mu = torch.empty_like(lse)
    pair = max(d, dv) <= _PAIR_MAX_HEAD_DIM
    if pair:  # s [Qd, Q] (its right half is s Q), [K, Kd] (its left half K), [V, Vd]
        ins = [_paired(q_dot, q, cdt, scale), _paired(k, k_dot, cdt), _paired(v, v_dot, cdt)] + [None] * 3
    else:
        ins = [t.to(cdt) for t in (q, k, v, q_dot, k_dot, v_dot)]
    for qg, kg, vg, qdg, kdg, vdg, og, odg, lg, mg in _groups(ins + [o, o_dot, lse, mu]):
        for hs, rs in _chunks(qg.shape[0], n_q, n_k, q.numel(), q.device.type == "cpu"):
            if pair:
                qqi, kki, vvi = qg[hs, rs], kg[hs], vg[hs]
                e = torch.bmm(qqi[..., d:], kki[..., :d].transpose(1, 2))  # S
                vi = vvi[..., :dv]
            else:
                qi, ki, vi = qg[hs, rs], kg[hs], vg[hs]
                e = _scores(qi, ki, scale)  # S
            m = e.amax(-1, keepdim=True)
            e.sub_(m).exp_()
            l = e.sum(-1, keepdim=True)
            lg[hs, rs] = m.add_(l.log())
            if pair:
                ed = torch.bmm(qqi, kki.transpose(1, 2)).mul_(e)  # E Sd
            else:
                ed = _scores(qdg[hs, rs], ki, scale).baddbmm_(qi, kdg[hs].transpose(1, 2), alpha=scale).mul_(e)
            mu_i = ed.sum(-1, keepdim=True).div_(l)
            ed.addcmul_(e, mu_i, value=-1.0)  # E (Sd - mu)
            rl = l.reciprocal_()
            if pair:
                ev = torch.bmm(e, vvi)  # [E V, E Vd]
                torch.mul(ev[..., :dv], rl, out=og[hs, rs])
                torch.baddbmm(ev[..., dv:], ed, vi, out=odg[hs, rs]).mul_(rl)
            else:
                torch.bmm(e, vi, out=og[hs, rs]).mul_(rl)
                torch.bmm(e, vdg[hs], out=odg[hs, rs]).baddbmm_(ed, vi).mul_(rl)
            mg[hs, rs] = mu_i
    return o.to(q.dtype), o_dot.to(q.dtype), lse.view(b, h, n_q), mu.view(b, h, n_q)


def _torch_backward(q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, g, g_dot, scale):
    """Torch-backend backward by the formulas in the module docstring.

    ``g``/``g_dot`` ([B, H, Nq, Dv]) may be None. Returns ``(dq, dk, dv, dq_dot, dk_dot, dv_dot)``;
    the tangent gradients are None when ``g_dot`` is None (they would be exactly zero). Per block:
    P = exp(s Q K^T - lse); B - delta = G V^T + Gd Vd^T - delta; Sd - mu = s Qd K^T + s Q Kd^T - mu. The
    inputs are read in their own layout (:func:`_groups`).
    """
    cdt = _acc_dtype(q.dtype)
    b, h, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[-1]
    has_g, has_gd = g is not None, g_dot is not None
    if not (has_g or has_gd):
        return tuple(torch.zeros_like(x) for x in (q, k, v)) + (None,) * 3
    ins = [t.to(cdt) for t in (q, k, v, q_dot, k_dot, v_dot)]
    oc = o.to(cdt)
    gc = g.to(cdt) if has_g else None
    gdc = g_dot.to(cdt) if has_gd else None
    lse = lse.to(cdt).reshape(b, h, n_q, 1)
    # Per-row scalars: delta_i = g_i.o_i + gd_i.od_i, alpha_i = gd_i.o_i.
    delta = torch.linalg.vecdot(gc, oc).unsqueeze(-1) if has_g else torch.zeros_like(lse)
    alpha = mu_ = None
    if has_gd:
        alpha = torch.linalg.vecdot(gdc, oc).unsqueeze(-1)
        delta += torch.linalg.vecdot(gdc, o_dot.to(cdt)).unsqueeze(-1)
        mu_ = mu.to(cdt).reshape(b, h, n_q, 1)
    chunks = _chunks(b * h, n_q, n_k, q.numel(), q.device.type == "cpu")
    whole = chunks[0][1] == slice(0, n_q)
    new_k = torch.empty if whole else torch.zeros
    dq = q.new_empty((b, h, n_q, d), dtype=cdt)
    dk = new_k((b, h, n_k, d), dtype=cdt, device=q.device)
    dv_ = new_k((b, h, n_k, dv), dtype=cdt, device=q.device)
    dq_dot = dk_dot = dv_dot = None
    if has_gd:
        dq_dot = torch.empty_like(dq)
        dk_dot, dv_dot = new_k(dk.shape, dtype=cdt, device=q.device), new_k(dv_.shape, dtype=cdt, device=q.device)
    tensors = ins + [gc, gdc, lse, delta, alpha, mu_, dq, dk, dv_, dq_dot, dk_dot, dv_dot]
    for (qg, kg, vg, qdg, kdg, vdg, gg, gdg, lseg, deltag, alphag, mug,
         dqg, dkg, dvg, dqdg, dkdg, dvdg) in _groups(tensors):
        for hs, rs in _chunks(qg.shape[0], n_q, n_k, q.numel(), q.device.type == "cpu"):
            qi, ki, vi, kdi = qg[hs, rs], kg[hs], vg[hs], kdg[hs]
            p = _scores(qi, ki, scale).sub_(lseg[hs, rs]).exp_()
            pt = p.transpose(1, 2)
            if has_g:
                gi = gg[hs, rs]
                t = torch.bmm(gi, vi.transpose(1, 2))
                if has_gd:
                    t.baddbmm_(gdg[hs, rs], vdg[hs].transpose(1, 2))
                t.sub_(deltag[hs, rs])  # B - delta
                _mm_into(dvg[hs], whole, pt, gi)  # P^T G
            else:
                t = torch.bmm(gdg[hs, rs], vdg[hs].transpose(1, 2)).sub_(deltag[hs, rs])
            if has_gd:
                gdi = gdg[hs, rs]
                c = _scores(qdg[hs, rs], ki, scale).baddbmm_(qi, kdi.transpose(1, 2), alpha=scale)
                c.sub_(mug[hs, rs])  # Sd - mu
                a = torch.bmm(gdi, vi.transpose(1, 2)).sub_(alphag[hs, rs])  # A - alpha
                t.addcmul_(a, c)
                ds_dot = a.mul_(p)
                pc = c.mul_(p).transpose(1, 2)
                if has_g:
                    dvg[hs].baddbmm_(pc, gdi)  # + (P (Sd - mu))^T Gd = Pd^T Gd
                else:
                    _mm_into(dvg[hs], whole, pc, gdi)
                _mm_into(dvdg[hs], whole, pt, gdi)  # P^T Gd
            ds = t.mul_(p)
            # The query-side gradients of a block are its own rows: written, never accumulated.
            dq_i = dqg[hs, rs].baddbmm_(ds, ki, beta=0.0, alpha=scale)
            _mm_into(dkg[hs], whole, ds.transpose(1, 2), qi, scale)  # s dS^T Q
            if has_gd:
                dq_i.baddbmm_(ds_dot, kdi, alpha=scale)
                dkg[hs].baddbmm_(ds_dot.transpose(1, 2), qdg[hs, rs], alpha=scale)  # + s dSd^T Qd
                dqdg[hs, rs].baddbmm_(ds_dot, ki, beta=0.0, alpha=scale)
                _mm_into(dkdg[hs], whole, ds_dot.transpose(1, 2), qi, scale)  # s dSd^T Q
    out = [dq, dk, dv_] + ([dq_dot, dk_dot, dv_dot] if has_gd else [None] * 3)
    like = (q, k, v, q_dot, k_dot, v_dot)
    return tuple(None if x is None else x.to(ref.dtype) for x, ref in zip(out, like))


# --------------------------------------------------------------------------------------------------
# 3. Registered ops (one per kernel entry point and backend) and the autograd.Function
# --------------------------------------------------------------------------------------------------
# ``sgflow::attention_dual_{fwd,bwd}_torch`` (custom ops) and ``..._triton`` (triton ops, registered on
# first use so that sgflow imports without triton) share one fake implementation; each forward op's
# autograd formula is its backward op, so each is differentiable on its own and opaque to
# torch.compile. ``triton_op`` infers schemas from annotations and cannot return None, so all the
# backward ops return empty tangent gradients where ``g_o_dot`` is None; :func:`_backward` maps them
# back to None.
Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


def _fwd_fake(q, k, v, q_dot, k_dot, v_dot, scale):
    b, h, n_q, _ = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = q.new_empty((b, h, n_q, v.shape[-1]))
    return o, torch.empty_like(o), q.new_empty((b, h, n_q), dtype=cdt), q.new_empty((b, h, n_q), dtype=cdt)


def _bwd_fake(q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, g_o, g_o_dot, scale):
    if g_o_dot is None:
        return tuple(t.new_empty(t.shape) for t in (q, k, v)) + tuple(q.new_empty(0) for _ in range(3))
    return tuple(t.new_empty(t.shape) for t in (q, k, v, q_dot, k_dot, v_dot))


def _empty_for_none(grads, q):
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@torch.library.custom_op("sgflow::attention_dual_fwd_torch", mutates_args=())
def _fwd_torch_op(q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(o.contiguous() for o in _torch_forward(q, k, v, q_dot, k_dot, v_dot, scale))  # as the fake says


@torch.library.custom_op("sgflow::attention_dual_bwd_torch", mutates_args=())
def _bwd_torch_op(q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor, o: Tensor,
                  o_dot: Tensor, lse: Tensor, mu: Tensor, g_o: OptTensor, g_o_dot: OptTensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _torch_backward(q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, g_o, g_o_dot, scale)
    # Contiguous, as the fake says: the gradients of a strided q (a view of one qkv projection) took its strides,
    # and inductor's check of the fake's strides against the real ones failed.
    return _empty_for_none(tuple(None if g is None else g.contiguous() for g in grads), q)


def _setup_context(ctx, inputs, output):
    *_, scale = inputs
    ctx.save_for_backward(*inputs[:6], *output)
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.scale = scale


def _op_autograd(bwd_op):
    def backward(ctx, g_o, g_o_dot, _g_lse, _g_mu):
        q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu = ctx.saved_tensors
        grads = bwd_op(q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, g_o, g_o_dot, ctx.scale)
        return (*grads, None)

    return backward


def _fwd_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a dual attention forward ([B, H, Nq, D] q; products of each backend, 2 per multiply-add): S,
    ``s Qd K^T + s Q Kd^T``, ``E V``, ``E Vd`` and ``E (Sd - mu) V``: 3x the plain forward's S and P V."""
    b, h, n_q, d = q_shape
    return 2 * b * h * n_q * k_shape[2] * (3 * d + 3 * v_shape[-1])


def _given(shape) -> bool:
    return shape is not None and math.prod(shape) > 0


def _bwd_flops_of(products):
    """A backward op's FLOP formula from ``products[(has_g, has_gd)] = (q/k-width, v-width)`` product counts."""

    def flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, n_q, d = q_shape
        g_o = args[7] if len(args) > 7 else kwargs.get("g_o")
        g_o_dot = args[8] if len(args) > 8 else kwargs.get("g_o_dot")
        dq, dv = products[(_given(g_o), _given(g_o_dot))]
        return 2 * b * h * n_q * k_shape[2] * (dq * d + dv * v_shape[-1])

    return flops


# Products of each backend's backward, by which cotangents are given (G of o, Gd of o_dot). The torch backend
# with both: 9 of the q/k width, 6 of the v width (7.5x the plain forward); the Triton kernels recompute the
# tile's scores in both the dk/dv and the dq kernel: 12 and 9.
_bwd_flops = _bwd_flops_of({(True, True): (9, 6), (True, False): (3, 2), (False, True): (9, 4), (False, False): (0, 0)})
_bwd_flops_triton = _bwd_flops_of({(True, True): (12, 9), (True, False): (4, 3), (False, True): (12, 6),
                                   (False, False): (0, 0)})


_fwd_torch_op.register_fake(_fwd_fake)
_bwd_torch_op.register_fake(_bwd_fake)
# FlopCounterMode sees the custom ops, not the products inside them (MFU counts, the benchmarks' FLOP ratios).
register_flop_formula(torch.ops.sgflow.attention_dual_fwd_torch)(_fwd_flops)
register_flop_formula(torch.ops.sgflow.attention_dual_bwd_torch)(_bwd_flops)
_fwd_torch_op.register_autograd(_op_autograd(_bwd_torch_op), setup_context=_setup_context)
register_loop_vmap(_fwd_torch_op)
register_loop_vmap(_bwd_torch_op)


@_once
def _triton_ops():
    """Register the Triton launchers as ``sgflow::attention_dual_{fwd,bwd}_triton`` (on first use)."""
    from sgflow_kernels import attention as K

    @torch.library.triton_op("sgflow::attention_dual_fwd_triton", mutates_args=())
    def fwd(q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor,
            scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return K.attention_dual_fwd(q, k, v, q_dot, k_dot, v_dot, scale)

    @torch.library.triton_op("sgflow::attention_dual_bwd_triton", mutates_args=())
    def bwd(q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor, o: Tensor,
            o_dot: Tensor, lse: Tensor, mu: Tensor, g_o: OptTensor, g_o_dot: OptTensor,
            scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        grads = K.attention_dual_bwd(q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, g_o, g_o_dot, scale)
        return _empty_for_none(grads, q)

    fwd.register_autograd(_op_autograd(bwd), setup_context=_setup_context)
    register_flop_formula(torch.ops.sgflow.attention_dual_fwd_triton)(_fwd_flops)
    register_flop_formula(torch.ops.sgflow.attention_dual_bwd_triton)(_bwd_flops_triton)
    register_loop_vmap(fwd)
    register_loop_vmap(bwd)
    return torch.ops.sgflow


def _ops(backend: str):
    """(forward op, backward op) of a backend ("torch", "triton" or "cpp")."""
    if backend == "triton":
        ns = _triton_ops()
        return ns.attention_dual_fwd_triton, ns.attention_dual_bwd_triton
    if backend == "cpp":  # the C++ CPU kernels (csrc/attention_dual_cpu*), registered by sgflow.ops.cpp_ext
        return torch.ops.sgflow.attention_dual_fwd_cpu, torch.ops.sgflow.attention_dual_bwd_cpu
    return torch.ops.sgflow.attention_dual_fwd_torch, torch.ops.sgflow.attention_dual_bwd_torch


# The automatic CPU choice runs the C++ op on every head width where its BLAS path is there (csrc/
# attention_dual_cpu_blas.cpp: heads wider than 8 as query-row tiles, products on the BLAS torch links, the
# elementwise steps fused into one pass per tile), else on heads at most this wide only. The vector kernel
# (heads up to 8) does the same products as the torch backend (3 + 3 forward, 9 + 6 backward) with every [Nq, Nk]
# intermediate in registers or L1; MKL's batched products gain more from a wide inner size than it does. One
# thread, heads split off the channels, 16 x 256 tokens, forward / backward ms, torch -> C++ vector kernel: heads
# of 8 53.2 / 128.7 -> 38.9 / 84.1; of 16 33.3 / 72.7 -> 38.3 / 83.9; of 32 25.0 / 57.1 -> 42.5 / 89.5; torch ->
# C++ BLAS tiles, heads of 32: 26.1 / 58.8 -> 22.6 / 36.1 (flow matching's SDPA, forward + backward: 21.3;
# the same machine later, under more load: torch 25.8 / 61.3, vector kernel 25.5 / 60.2, BLAS tiles 24.9 /
# 40.6, SDPA 24.3; benchmarks/NOTES.md). An explicit backend="cpp" runs the C++ op on any head width.
_CPP_MAX_HEAD_DIM = 8
# Whether the automatic CPU choice takes the C++ BLAS path for wider heads (False: the torch backend, e.g. the
# benchmarks' A/B).
CPP_WIDE_HEADS = True


def _cpu_choice(chosen: str, explicit: bool, q: torch.Tensor, v: torch.Tensor) -> str:
    """"cpp" where its kernel runs (float32 / float64; narrow heads, or any with the BLAS path, unless asked
    for), else "torch"."""
    if chosen != "cpp":
        return chosen
    if q.dtype not in (torch.float32, torch.float64):
        return "torch"
    if not explicit and max(q.shape[-1], v.shape[-1]) > _CPP_MAX_HEAD_DIM:
        from sgflow.ops import cpp_ext

        return "cpp" if CPP_WIDE_HEADS and cpp_ext.blas_available() else "torch"
    return chosen


def forward_ops() -> set:
    """The dual attention's registered forward ops (the torch backend's, and Triton's once registered):
    the ops whose outputs ``(o, o_dot, lse, mu)`` a recomputed block keeps (``sgflow.autodual.plan``:
    recomputing them is the dual attention's 6 products, keeping them 2 activations of the block's width)."""
    from sgflow.ops import cpp_ext

    cpp_ext.load()  # registers the C++ op where the extension is built
    ops = {torch.ops.sgflow.attention_dual_fwd_torch.default}
    for name in ("attention_dual_fwd_triton", "attention_dual_fwd_cpu"):
        if hasattr(torch.ops.sgflow, name):
            ops.add(getattr(torch.ops.sgflow, name).default)
    return ops


def _backward(backend, q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, g_o, g_o_dot, scale):
    """``(dq, dk, dv, dq_dot, dk_dot, dv_dot)``; the tangent gradients are None when ``g_o_dot`` is None."""
    grads = _ops(backend)[1](q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, g_o, g_o_dot, scale)
    return grads[:3] + ((None,) * 3 if g_o_dot is None else tuple(grads[3:]))


class AttentionDual(torch.autograd.Function):
    """``(o, o_dot, lse, mu) = AttentionDual.apply(q, k, v, q_dot, k_dot, v_dot, scale, backend, kept=None)``.

    Runs the backend's registered forward op (or, given ``kept``, returns the outputs of an earlier call on
    the same values as new tensors sharing their storage: a recomputed block's attention); saves the six
    inputs, the two outputs ([B, H, Nq, Dv], needed for the row scalars alpha and delta) and the per-row statistics lse and mu ([B, H, Nq], not
    differentiable); P ([Nq, Nk] per head) is recomputed blockwise in backward. ``backend`` is
    ``"torch"`` or ``"triton"``. Either output gradient may be None; the tangent inputs then get None
    when ``o_dot`` has no gradient. Not twice differentiable (double backward raises).
    ``torch.func.vmap`` runs through it (the ops' vmap rules loop over the vmapped dim).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, q_dot, k_dot, v_dot, scale, backend, kept=None):
        if kept is not None:
            return tuple(t.detach() for t in kept)
        return _ops(backend)[0](q, k, v, q_dot, k_dot, v_dot, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs[:7], output)  # the forward op's own: inputs, outputs, statistics, scale
        ctx.backend = inputs[7]
        # None gradients let backward skip the work for an unused output.
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable  # lse/mu are saved without a graph, so a double backward would be wrong
    def backward(ctx, g_o, g_o_dot, _g_lse, _g_mu):
        if g_o is None and g_o_dot is None:
            return (None,) * 9
        grads = _backward(ctx.backend, *ctx.saved_tensors, g_o, g_o_dot, ctx.scale)
        return (*grads, None, None, None)


# --------------------------------------------------------------------------------------------------
# 4. Functional API
# --------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, q_dot, k_dot, v_dot):
    names = ("q", "k", "v", "q_dot", "k_dot", "v_dot")
    tensors = (q, k, v, q_dot, k_dot, v_dot)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention_dual: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention_dual: {name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
    for name, p, t in (("q", q, q_dot), ("k", k, k_dot), ("v", v, v_dot)):
        if t.shape != p.shape:
            raise ValueError(
                f"attention_dual: {name}_dot shape {tuple(t.shape)} must equal {name} shape {tuple(p.shape)}"
            )
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            "attention_dual: q, k, v must share batch and head dims [B, H]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"attention_dual: q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"attention_dual: k and v sequence lengths differ: {k.shape[2]} vs {v.shape[2]}")
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError(
            f"attention_dual: empty sequence or head dim: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not q.is_floating_point():
        raise TypeError(f"attention_dual: inputs must be floating point, got {q.dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != q.dtype:
            raise TypeError(f"attention_dual: dtype mismatch: q is {q.dtype} but {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention_dual: device mismatch: q is on {q.device} but {name} is on {t.device}")


@autocast_dual
def attention_dual(q, k, v, q_dot, k_dot, v_dot, scale=None, backend=None, kept=None):
    """Softmax attention and its JVP in one pass: ``(o, o_dot)``.

    Args:
        q, q_dot: [B, H, Nq, D]; k, k_dot: [B, H, Nk, D]; v, v_dot: [B, H, Nk, Dv]
            (all the same dtype and device; primal and tangent shapes equal).
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"torch"`` | ``"triton"`` | ``"cpp"`` | None (see :func:`sgflow.ops.backend.resolve_backend`);
            ``"cuda"`` has no dedicated attention kernel and uses Triton. ``"cpp"`` (the C++ CPU kernel,
            float32 / float64; other dtypes run on ``"torch"``) is the automatic CPU choice where the extension
            is built: for heads of at most :data:`_CPP_MAX_HEAD_DIM`, and for wider ones where it found a BLAS
            (``cpp_ext.blas_available()``).
        kept: for a block recomputed in backward (``sgflow.dualize``'s plan): a list, empty on the block's
            forward, which then appends this call's outputs ``(o, o_dot, lse, mu)`` to it, and holding them
            on the recomputation, which then runs none of the forward's products (the same values, the
            autograd node taken from these inputs). None: an ordinary call.

    Returns:
        ``o = softmax(scale q k^T) v`` and ``o_dot`` = its JVP in direction (q_dot, k_dot, v_dot),
        both [B, H, Nq, Dv]. Differentiable w.r.t. all six inputs (gradients of both outputs, incl.
        the second-order terms of o_dot in q and k), with O(N) saved memory per row.
    """
    _check_inputs(q, k, v, q_dot, k_dot, v_dot)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    chosen = resolve_backend(q, backend, op="attention")
    if chosen == "cuda":
        chosen = "triton"
    chosen = _cpu_choice(chosen, backend is not None, q, v)
    if kept:
        o = kept[0]
        if o.shape != (*q.shape[:3], v.shape[3]) or o.dtype != q.dtype or o.device != q.device:
            raise RuntimeError(f"attention_dual: the kept outputs {tuple(o.shape)} {o.dtype} do not fit this call "
                               f"(q {tuple(q.shape)}, v {tuple(v.shape)}, {q.dtype}): the recomputed block ran "
                               f"other attention calls than its forward")
        return AttentionDual.apply(q, k, v, q_dot, k_dot, v_dot, scale, chosen, tuple(kept))[:2]
    out = AttentionDual.apply(q, k, v, q_dot, k_dot, v_dot, scale, chosen)
    if kept is not None:
        kept.extend(t.detach() for t in out)
    return out[:2]


# On a CUDA machine (Triton the default there) register the Triton ops at import: a first registration
# inside a torch.compile trace is a graph break.
if torch.cuda.is_available():
    from sgflow.ops.backend import triton_available as _triton_available

    if _triton_available():
        _triton_ops()
