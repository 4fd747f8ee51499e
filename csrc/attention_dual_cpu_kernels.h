// CPU kernels of the dual softmax attention, instantiated once per instruction set.
//
// No include guard on purpose, like gn_silu_dual_cpu_kernels.h, which a translation unit includes first
// (same SGFLOW_ISA, same target pragma): exp_nonpos is reused from there. Defines
// sgflow::cpu::SGFLOW_ISA::attention_dual_fwd / attention_dual_bwd (attention_dual_cpu.h).
//
// Math: python/sgflow/ops/attention.py (module docstring). Per (batch, head), query row i, key j, scale s:
//   forward:  S = s q k^T, Sd = s (qd k^T + q kd^T), E = exp(S - m), l = rowsum E, mu = rowsum(E Sd) / l,
//             o = E v / l, od = (E vd + E (Sd - mu) v) / l, lse = m + log l
//   backward: P = exp(S - lse), alpha = gd.o, delta = g.o + gd.od, A = gd v^T - alpha,
//             T = g v^T + gd vd^T - delta, C = Sd - mu,
//             dS = P (T + A C), dSd = P A;  dq = s (dS k + dSd kd), dqd = s dSd k,
//             dk = s (dS^T q + dSd^T qd), dkd = s dSd^T q, dv = P^T g + (P C)^T gd, dvd = P^T gd.
//
// Why a kernel: with heads of 8 (a diffusers U-Net's default) every product has inner size 8, so the torch
// backend's time goes to ~45 passes over each [Nq, Nk] block (writing S, subtracting, exponentiating,
// multiplying ...), not to arithmetic. Here a tile of 4 query rows keeps its score rows (S, Sd, ...: Nk values
// each) in L1 and each (i, j) is touched once per step of the formulas above, the inner size in registers.
//
// Layout: one head at a time per thread. Its keys and values are copied transposed and padded to a multiple
// of kAttnBlock columns (k^T [D, Np] ...), so every loop over keys is over contiguous, whole vectors:
//   * rows():   score rows u_j = sum_c x_c M_cj (and w_j = sum_c y_c M_cj + x_c N_cj), a block of keys in
//               vector registers while c runs over the head dim;
//   * dots():   o, od, dq, dqd are dot products of a tile's score rows with the transposed rows;
//   * axpys():  the key-side gradients accumulate into transposed rows (dk^T [D, Np] ...), once per tile,
//               written out once per head.
// Padded keys have zero k, v and get P = 0, so they add nothing; their gradient columns are never written out.
// GCC vector extensions (a block of 16 values: one AVX-512 register of f32, two of f64, four SSE ones) keep
// the block accumulators in registers on every instruction set.

#ifndef SGFLOW_ISA
#error "define SGFLOW_ISA before including attention_dual_cpu_kernels.h"
#endif

namespace sgflow::cpu::SGFLOW_ISA {
namespace {

template <typename A>
struct Block;
template <>
struct Block<float> {
  typedef float type __attribute__((vector_size(sizeof(float) * kAttnBlock)));
};
template <>
struct Block<double> {
  typedef double type __attribute__((vector_size(sizeof(double) * kAttnBlock)));
};

template <typename A>
inline typename Block<A>::type vload(const A* p) {
  typename Block<A>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename A>
inline void vstore(A* p, typename Block<A>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// Sum of a block's lanes as a tree of half-width vectors (log depth instead of a chain of 16 dependent adds;
// no measurable change on AVX-512, where the dots' loads dominate).
template <typename A, int64_t N>
struct Lanes {
  typedef A type __attribute__((vector_size(sizeof(A) * N)));
  static inline A sum(type v) {
    typedef A half __attribute__((vector_size(sizeof(A) * N / 2)));
    half lo, hi;
    __builtin_memcpy(&lo, &v, sizeof(lo));
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return Lanes<A, N / 2>::sum(lo + hi);
  }
};
template <typename A>
struct Lanes<A, 2> {
  typedef A type __attribute__((vector_size(sizeof(A) * 2)));
  static inline A sum(type v) { return v[0] + v[1]; }
};

template <typename A>
inline A hsum(typename Block<A>::type v) {
  return Lanes<A, kAttnBlock>::sum(v);
}

template <typename A>
inline const A* head_of(const AttnArgs& a, int k, int64_t b, int64_t h) {
  return static_cast<const A*>(a.in[k]) + b * a.stride[k][0] + h * a.stride[k][1];
}

// dst[c * np + j] = src[j * sn + c] for j < n, zero for n <= j < np: one head's keys (or values) as rows.
template <typename A>
void gather_t(const A* src, int64_t sn, int64_t n, int64_t cols, int64_t np, A* dst) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < cols; ++c) dst[c * np + j] = src[j * sn + c];
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t j = n; j < np; ++j) dst[c * np + j] = A(0);
}

// u_j = sum_c x_c M[c, j]; with W also w_j = sum_c (y_c M[c, j] + x_c N[c, j]) (y_c = 0 without Y), for
// the NB blocks of keys from j0: NB independent accumulator chains (one chain, an FMA's latency per c,
// left the forward latency-bound).
template <typename A, bool W, bool Y, int NB>
inline void rows_at(A* u, A* w, const A* x, const A* y, const A* M, const A* N, int64_t cols, int64_t np,
                    int64_t j0) {
  using V = typename Block<A>::type;
  V uu[NB] = {}, ww[NB] = {}, wy[NB] = {};  // w's two products in separate chains (one FMA each per c)
  for (int64_t c = 0; c < cols; ++c) {
    const A xc = x[c], yc = Y ? y[c] : A(0);
    for (int b = 0; b < NB; ++b) {
      const V m = vload(M + c * np + j0 + b * kAttnBlock);
      uu[b] += xc * m;
      if constexpr (W) {
        ww[b] += xc * vload(N + c * np + j0 + b * kAttnBlock);
        if constexpr (Y) wy[b] += yc * m;
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    vstore(u + j0 + b * kAttnBlock, uu[b]);
    if constexpr (W) vstore(w + j0 + b * kAttnBlock, Y ? ww[b] + wy[b] : ww[b]);
  }
}

// M, N: [cols, np] rows; u, w: [np].
template <typename A, bool W, bool Y>
void rows(A* u, A* w, const A* x, const A* y, const A* M, const A* N, int64_t cols, int64_t np) {
  int64_t j0 = 0;
  for (; j0 + 4 * kAttnBlock <= np; j0 += 4 * kAttnBlock) rows_at<A, W, Y, 4>(u, w, x, y, M, N, cols, np, j0);
  for (; j0 < np; j0 += kAttnBlock) rows_at<A, W, Y, 1>(u, w, x, y, M, N, cols, np, j0);
}

// out[r * os] = scale sum_j (r1[r][j] M[j] (+ r2[r][j] M2[j])) for the R query rows of a tile: M, M2 loaded
// once for all R, one accumulator chain per row.
template <typename A, bool TWO, int R>
__attribute__((noinline)) void dots(A* out, int64_t os, A scale, A* const* r1, const A* M, A* const* r2,
                                    const A* M2, int64_t np) {
  static_assert(R == 1 || R == 4, "tiles of 1 or 4 rows");
  using V = typename Block<A>::type;
  // Named accumulators, one chain per row and product, and not inlined: GCC kept an array of them, or (inlined
  // into a tile) one of them, on the stack (a load and a store per iteration in the profile).
  V a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
  for (int64_t j0 = 0; j0 < np; j0 += kAttnBlock) {
    const V m = vload(M + j0);
    a0 += vload(r1[0] + j0) * m;
    if constexpr (R == 4) {
      a1 += vload(r1[1] + j0) * m;
      a2 += vload(r1[2] + j0) * m;
      a3 += vload(r1[3] + j0) * m;
    }
    if constexpr (TWO) {
      const V m2 = vload(M2 + j0);
      b0 += vload(r2[0] + j0) * m2;
      if constexpr (R == 4) {
        b1 += vload(r2[1] + j0) * m2;
        b2 += vload(r2[2] + j0) * m2;
        b3 += vload(r2[3] + j0) * m2;
      }
    }
  }
  out[0] = scale * hsum<A>(a0 + b0);
  if constexpr (R == 4) {
    out[os] = scale * hsum<A>(a1 + b1);
    out[2 * os] = scale * hsum<A>(a2 + b2);
    out[3 * os] = scale * hsum<A>(a3 + b3);
  }
}

// dst[j] += sum_r (x[r] r1[r][j] (+ y[r] r2[r][j])): a key-side gradient row, read and written once per tile of
// R query rows (once per row, these rows' traffic to L2 was half the backward).
template <typename A, bool TWO, int R>
inline void axpys(A* dst, const A* x, A* const* r1, const A* y, A* const* r2, int64_t np) {
  using V = typename Block<A>::type;
  for (int64_t j0 = 0; j0 < np; j0 += kAttnBlock) {
    V d = x[0] * vload(r1[0] + j0), e = {};  // two chains, joined with dst at the end
    if constexpr (TWO) e = y[0] * vload(r2[0] + j0);
    for (int r = 1; r < R; ++r) {
      d += x[r] * vload(r1[r] + j0);
      if constexpr (TWO) e += y[r] * vload(r2[r] + j0);
    }
    vstore(dst + j0, vload(dst + j0) + (TWO ? d + e : d));
  }
}

// One head's transposed, padded keys and values (and, in backward, their gradients) in the scratch.
template <typename A>
struct HeadRows {
  A *kT, *kdT, *vT, *vdT;
  int64_t np;
  HeadRows(const AttnArgs& a, int64_t b, int64_t h, A* scratch) : np(attn_padded(a.Nk)) {
    kT = scratch, kdT = kT + a.D * np, vT = kdT + a.D * np, vdT = vT + a.Dv * np;
    gather_t(head_of<A>(a, 1, b, h), a.stride[1][2], a.Nk, a.D, np, kT);
    gather_t(head_of<A>(a, 4, b, h), a.stride[4][2], a.Nk, a.D, np, kdT);
    gather_t(head_of<A>(a, 2, b, h), a.stride[2][2], a.Nk, a.Dv, np, vT);
    gather_t(head_of<A>(a, 5, b, h), a.stride[5][2], a.Nk, a.Dv, np, vdT);
  }
};

// Forward of the R query rows from i0 of one head: S, Sd rows, softmax statistics, then o and od by dots
// shared over the tile. rows: 2R score rows [np] and 2R x D scaled queries.
template <typename A, int R>
void fwd_tile(const AttnArgs& a, const HeadRows<A>& hr, const A* q, const A* qd, A* o, A* od, A* lse, A* mu_out,
              int64_t i0, A* rows_) {
  const int64_t D = a.D, Dv = a.Dv, Nk = a.Nk, np = hr.np;
  const A sc = static_cast<A>(a.scale);
  A *S[R], *E[R], *qs = rows_ + 2 * R * np, *qds = qs + R * D;
  A rl[R];
  for (int r = 0; r < R; ++r) {
    S[r] = rows_ + r * np, E[r] = rows_ + (R + r) * np;
    const int64_t i = i0 + r;
    for (int64_t c = 0; c < D; ++c) {
      qs[r * D + c] = sc * q[i * a.stride[0][2] + c];
      qds[r * D + c] = sc * qd[i * a.stride[3][2] + c];
    }
    A *s = S[r], *sd = E[r];
    rows<A, true, true>(s, sd, qs + r * D, qds + r * D, hr.kT, hr.kdT, D, np);  // s = S, sd = Sd
    A m = s[0];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < Nk; ++j) m = s[j] > m ? s[j] : m;
    A l = A(0), esd = A(0);
#pragma omp simd reduction(+ : l, esd)
    for (int64_t j = 0; j < Nk; ++j) {
      const A e = exp_nonpos(s[j] - m);
      s[j] = e;
      l += e;
      esd += e * sd[j];
    }
    for (int64_t j = Nk; j < np; ++j) s[j] = A(0);
    const A mu = esd / l;
#pragma omp simd
    for (int64_t j = 0; j < np; ++j) sd[j] = s[j] * (sd[j] - mu);  // E (Sd - mu)
    lse[i] = m + static_cast<A>(__builtin_log(static_cast<double>(l)));
    mu_out[i] = mu;
    rl[r] = A(1) / l;
  }
  // o = E v / l, od = (E vd + E (Sd - mu) v) / l; the 1/l applied per row after the dots.
  for (int64_t c = 0; c < Dv; ++c) {
    dots<A, false, R>(o + i0 * Dv + c, Dv, A(1), S, hr.vT + c * np, nullptr, nullptr, np);
    dots<A, true, R>(od + i0 * Dv + c, Dv, A(1), S, hr.vdT + c * np, E, hr.vT + c * np, np);
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < Dv; ++c) o[(i0 + r) * Dv + c] *= rl[r], od[(i0 + r) * Dv + c] *= rl[r];
}

template <typename A>
void fwd_head(const AttnArgs& a, int64_t bh, A* scratch) {
  const int64_t b = bh / a.H, h = bh % a.H;
  const HeadRows<A> hr(a, b, h, scratch);
  A* rows_ = hr.vdT + a.Dv * hr.np;
  const A *q = head_of<A>(a, 0, b, h), *qd = head_of<A>(a, 3, b, h);
  A* o = static_cast<A*>(a.out[0]) + bh * a.Nq * a.Dv;
  A* od = static_cast<A*>(a.out[1]) + bh * a.Nq * a.Dv;
  A* lse = static_cast<A*>(a.lse) + bh * a.Nq;
  A* mu = static_cast<A*>(a.mu) + bh * a.Nq;
  int64_t i0 = 0;
  for (; i0 + kAttnRows <= a.Nq; i0 += kAttnRows) fwd_tile<A, kAttnRows>(a, hr, q, qd, o, od, lse, mu, i0, rows_);
  for (; i0 < a.Nq; ++i0) fwd_tile<A, 1>(a, hr, q, qd, o, od, lse, mu, i0, rows_);
}

// Backward state of one head: inputs, the key-side gradient rows (dk^T [D, np] ...), outputs.
template <typename A>
struct BwdHead {
  const AttnArgs& a;
  HeadRows<A> hr;
  A *dkT, *dkdT, *dvT, *dvdT, *rows_;
  const A *q, *qd, *o, *od, *g, *gd, *lse, *mu;
  A *dq, *dqd;
  BwdHead(const AttnArgs& a_, int64_t bh, A* scratch)
      : a(a_), hr(a_, bh / a_.H, bh % a_.H, scratch) {
    const int64_t b = bh / a.H, h = bh % a.H, np = hr.np;
    dkT = hr.vdT + a.Dv * np, dkdT = dkT + a.D * np, dvT = dkdT + a.D * np, dvdT = dvT + a.Dv * np;
    rows_ = dvdT + a.Dv * np;
    for (int64_t j = 0; j < (2 * a.D + 2 * a.Dv) * np; ++j) dkT[j] = A(0);
    q = head_of<A>(a, 0, b, h), qd = head_of<A>(a, 3, b, h), o = head_of<A>(a, 6, b, h), od = head_of<A>(a, 7, b, h);
    g = a.in[8] ? head_of<A>(a, 8, b, h) : nullptr, gd = a.in[9] ? head_of<A>(a, 9, b, h) : nullptr;
    lse = static_cast<const A*>(a.lse) + bh * a.Nq, mu = static_cast<const A*>(a.mu) + bh * a.Nq;
    dq = static_cast<A*>(a.out[0]) + bh * a.Nq * a.D;
    dqd = gd ? static_cast<A*>(a.out[3]) + bh * a.Nq * a.D : nullptr;
  }
};

// Backward of the R query rows from i0 (G / GD: whether g / g_dot are given). Per row: P, dS, dSd, P (Sd - mu)
// rows; then dq, dqd by dots and the key-side gradient rows by axpys, both shared over the tile.
template <typename A, bool G, bool GD, int R>
void bwd_tile(BwdHead<A>& st, int64_t i0) {
  const AttnArgs& a = st.a;
  const int64_t D = a.D, Dv = a.Dv, Nk = a.Nk, np = st.hr.np;
  const A sc = static_cast<A>(a.scale);
  A *P[R], *PC[R], *DS[R], *DSD[R];
  A *qs = st.rows_ + 4 * R * np, *qds = qs + R * D;
  const A *gi[R], *gdi[R];
  for (int r = 0; r < R; ++r) {
    P[r] = st.rows_ + r * np, PC[r] = P[r] + R * np, DS[r] = PC[r] + R * np, DSD[r] = DS[r] + R * np;
    const int64_t i = i0 + r;
    const A *qi = st.q + i * a.stride[0][2], *qdi = st.qd + i * a.stride[3][2];
    const A *oi = st.o + i * a.stride[6][2], *odi = st.od + i * a.stride[7][2];
    gi[r] = G ? st.g + i * a.stride[8][2] : nullptr;
    gdi[r] = GD ? st.gd + i * a.stride[9][2] : nullptr;
    A delta = A(0), alpha = A(0);
    for (int64_t c = 0; c < Dv; ++c) {
      if constexpr (G) delta += gi[r][c] * oi[c];
      if constexpr (GD) {
        delta += gdi[r][c] * odi[c];
        alpha += gdi[r][c] * oi[c];
      }
    }
    for (int64_t c = 0; c < D; ++c) {
      qs[r * D + c] = sc * qi[c];
      qds[r * D + c] = sc * qdi[c];
    }
    A *s = P[r], *c_ = PC[r], *t = DS[r], *am = DSD[r];
    rows<A, GD, true>(s, c_, qs + r * D, qds + r * D, st.hr.kT, st.hr.kdT, D, np);  // S, Sd
    if constexpr (G && GD) {
      rows<A, true, true>(am, t, gdi[r], gi[r], st.hr.vT, st.hr.vdT, Dv, np);  // gd v^T, g v^T + gd vd^T
    } else if constexpr (G) {
      rows<A, false, false>(t, nullptr, gi[r], nullptr, st.hr.vT, nullptr, Dv, np);  // g v^T
    } else {
      rows<A, true, false>(am, t, gdi[r], nullptr, st.hr.vT, st.hr.vdT, Dv, np);  // gd v^T, gd vd^T
    }
    const A lse_i = st.lse[i], mu_i = st.mu[i];
#pragma omp simd
    for (int64_t j = 0; j < Nk; ++j) {
      const A x = s[j] - lse_i;
      const A p = exp_nonpos(x < A(0) ? x : A(0));  // S <= lse up to rounding
      s[j] = p;
      if constexpr (GD) {
        const A cc = c_[j] - mu_i, aa = am[j] - alpha;
        t[j] = p * (t[j] - delta + aa * cc);  // dS
        am[j] = p * aa;                       // dSd
        c_[j] = p * cc;                       // P (Sd - mu)
      } else {
        t[j] = p * (t[j] - delta);
      }
    }
    for (int64_t j = Nk; j < np; ++j) s[j] = t[j] = am[j] = c_[j] = A(0);
  }
  A x[R], y[R];
  for (int64_t c = 0; c < D; ++c) {
    const A *kT = st.hr.kT + c * np, *kdT = st.hr.kdT + c * np;
    dots<A, GD, R>(st.dq + i0 * D + c, D, sc, DS, kT, DSD, kdT, np);  // s (dS k + dSd kd)
    if constexpr (GD) dots<A, false, R>(st.dqd + i0 * D + c, D, sc, DSD, kT, nullptr, nullptr, np);  // s dSd k
    for (int r = 0; r < R; ++r) x[r] = qs[r * D + c], y[r] = qds[r * D + c];
    axpys<A, GD, R>(st.dkT + c * np, x, DS, y, DSD, np);  // s (dS^T q + dSd^T qd)
    if constexpr (GD) axpys<A, false, R>(st.dkdT + c * np, x, DSD, nullptr, nullptr, np);  // s dSd^T q
  }
  for (int64_t c = 0; c < Dv; ++c) {
    for (int r = 0; r < R; ++r) x[r] = G ? gi[r][c] : A(0), y[r] = GD ? gdi[r][c] : A(0);
    if constexpr (G && GD) {
      axpys<A, true, R>(st.dvT + c * np, x, P, y, PC, np);  // P^T g + (P (Sd - mu))^T gd
    } else if constexpr (G) {
      axpys<A, false, R>(st.dvT + c * np, x, P, nullptr, nullptr, np);
    } else {
      axpys<A, false, R>(st.dvT + c * np, y, PC, nullptr, nullptr, np);
    }
    if constexpr (GD) axpys<A, false, R>(st.dvdT + c * np, y, P, nullptr, nullptr, np);  // P^T gd
  }
}

template <typename A, bool G, bool GD>
void bwd_head(const AttnArgs& a, int64_t bh, A* scratch) {
  BwdHead<A> st(a, bh, scratch);
  int64_t i0 = 0;
  for (; i0 + kAttnRows <= a.Nq; i0 += kAttnRows) bwd_tile<A, G, GD, kAttnRows>(st, i0);
  for (; i0 < a.Nq; ++i0) bwd_tile<A, G, GD, 1>(st, i0);
  // The key-side gradients, transposed back: [Nk, D] rows of this head.
  const int64_t nk = a.Nk, np = st.hr.np, D = a.D, Dv = a.Dv;
  A* outs[4] = {static_cast<A*>(a.out[1]) + bh * nk * D, GD ? static_cast<A*>(a.out[4]) + bh * nk * D : nullptr,
                static_cast<A*>(a.out[2]) + bh * nk * Dv, GD ? static_cast<A*>(a.out[5]) + bh * nk * Dv : nullptr};
  const A* rows_[4] = {st.dkT, st.dkdT, st.dvT, st.dvdT};
  const int64_t cols[4] = {D, D, Dv, Dv};
  for (int k = 0; k < 4; ++k) {
    if (!outs[k]) continue;
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t c = 0; c < cols[k]; ++c) outs[k][j * cols[k] + c] = rows_[k][c * np + j];
  }
}

template <typename A>
void fwd_typed(const AttnArgs& a, int64_t begin, int64_t end, void* scratch) {
  for (int64_t bh = begin; bh < end; ++bh) fwd_head<A>(a, bh, static_cast<A*>(scratch));
}

template <typename A>
void bwd_typed(const AttnArgs& a, int64_t begin, int64_t end, void* scratch) {
  const bool g = a.in[8] != nullptr, gd = a.in[9] != nullptr;
  for (int64_t bh = begin; bh < end; ++bh) {
    A* sc = static_cast<A*>(scratch);
    if (g && gd)
      bwd_head<A, true, true>(a, bh, sc);
    else if (g)
      bwd_head<A, true, false>(a, bh, sc);
    else
      bwd_head<A, false, true>(a, bh, sc);
  }
}

}  // namespace

void attention_dual_fwd(const AttnArgs& a, int64_t begin, int64_t end, void* scratch) {
  if (a.f64)
    fwd_typed<double>(a, begin, end, scratch);
  else
    fwd_typed<float>(a, begin, end, scratch);
}

// Needs g or g_dot (the binding answers "neither" without calling it).
void attention_dual_bwd(const AttnArgs& a, int64_t begin, int64_t end, void* scratch) {
  if (a.f64)
    bwd_typed<double>(a, begin, end, scratch);
  else
    bwd_typed<float>(a, begin, end, scratch);
}

}  // namespace sgflow::cpu::SGFLOW_ISA
