// The dual softmax attention on CPU for wide heads: query-row tiles whose products go to the BLAS torch links
// (sgemm_ / dgemm_, found at run time), with the elementwise steps of the formulas fused into one pass per tile.
//
// Why: for wide heads the products dominate. The vector kernels of attention_dual_cpu_kernels.h are written
// for heads of 8 (every product of inner size 8); the torch backend (sgflow/ops/attention.py) runs the
// products through torch.bmm, but as whole [heads, Nq, Nk] blocks with a dozen separate elementwise passes
// over them (out of cache) and ~30 Python calls per block: at heads of 32 (16 x 256 tokens) half its
// backward's time is not products. Same shape, one thread, backward: torch backend 59-61 ms, vector kernel 60,
// these tiles 36-41 (benchmarks/NOTES.md, issue 18 part 13).
//
// Math: python/sgflow/ops/attention.py (module docstring), the same as attention_dual_cpu_kernels.h:
//   forward:  S = s q k^T, E = exp(S - m), l = rowsum E, Sd = s (qd k^T + q kd^T), mu = rowsum(E Sd) / l,
//             o = E v / l, od = (E vd + E (Sd - mu) v) / l, lse = m + log l
//   backward: P = exp(S - lse), alpha = gd.o, delta = g.o + gd.od, A = gd v^T - alpha,
//             T = g v^T + gd vd^T - delta, C = Sd - mu, dS = P (T + A C), dSd = P A;
//             dq = s (dS k + dSd kd), dqd = s dSd k, dk = s (dS^T q + dSd^T qd), dkd = s dSd^T q,
//             dv = P^T g + (P C)^T gd, dvd = P^T gd.
// Per head (one thread each), per tile of R query rows: the [R, Nk] score-sized blocks (S / P, Sd / C, T, A) in
// a scratch of 4 R Nk values (R chosen so that it stays in L2), the key-side gradients accumulated in the
// outputs. Memory stays linear in the sequence length.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#if !defined(_WIN32)
#include <dlfcn.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "attention_dual_cpu.h"

namespace sgflow {
namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*, const int*);

template <typename T>
bool self_test(void (*gemm)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                            const int*, const T*, const int*, const T*, T*, const int*));

// The Fortran BLAS entry points of the library torch was built with (MKL in the x86 wheels), looked up in the
// process rather than linked: a torch without them leaves the extension loadable and this path off. Integer
// arguments are passed as pointers to int64 values (little-endian: an LP64 BLAS reads the same small value from
// their low half as an ILP64 one from all of it), and a small product is checked once before the path is used.
struct BlasFns {
  sgemm_fn s = nullptr;
  dgemm_fn d = nullptr;
  BlasFns() {
#if !defined(_WIN32) && (defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)
    s = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "sgemm_"));
    d = reinterpret_cast<dgemm_fn>(dlsym(RTLD_DEFAULT, "dgemm_"));
    if (s == nullptr || d == nullptr || !self_test<float>(s) || !self_test<double>(d)) s = nullptr, d = nullptr;
#endif
  }
};

const BlasFns& blas() {
  static const BlasFns fns;
  return fns;
}

// Column-major C [2, 3] (ld 4) = A^T B with A [3, 2] (ld 5) and B [3, 3] (ld 3) against a plain loop.
template <typename T>
bool self_test(void (*gemm)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                            const int*, const T*, const int*, const T*, T*, const int*)) {
  const int64_t m = 2, n = 3, k = 3, lda = 5, ldb = 3, ldc = 4;
  T a[15], b[9], c[12], want[12];
  for (int i = 0; i < 15; ++i) a[i] = static_cast<T>((i * 7) % 5 - 2);
  for (int i = 0; i < 9; ++i) b[i] = static_cast<T>((i * 3) % 4 - 1);
  for (int i = 0; i < 12; ++i) c[i] = want[i] = static_cast<T>(i);
  const T alpha = 2, beta = 1;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p) acc += a[i * lda + p] * b[j * ldb + p];
      want[j * ldc + i] = alpha * acc + beta * want[j * ldc + i];
    }
  const char ta = 'T', tb = 'N';
  gemm(&ta, &tb, reinterpret_cast<const int*>(&m), reinterpret_cast<const int*>(&n),
       reinterpret_cast<const int*>(&k), &alpha, a, reinterpret_cast<const int*>(&lda), b,
       reinterpret_cast<const int*>(&ldb), &beta, c, reinterpret_cast<const int*>(&ldc));
  for (int i = 0; i < 12; ++i)
    if (c[i] != want[i]) return false;
  return true;
}

inline void gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                 const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                 const int* ldc) {
  blas().s(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                 const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                 const int* ldc) {
  blas().d(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C [M, N] = alpha op(A) op(B) + beta C (A stored [M, K], or [K, M] when ta; B [K, N], or [N, K] when
// tb; ld*: row strides) as the column-major C^T = op(B)^T op(A)^T.
template <typename T>
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
        int64_t ldb, T beta, T* C, int64_t ldc) {
  const char cta = tb ? 'T' : 'N', ctb = ta ? 'T' : 'N';
  const int64_t dims[6] = {N, M, K, ldb, lda, ldc};  // int64 storage: see BlasFns
  const int* i = reinterpret_cast<const int*>(dims);
  gemm(&cta, &ctb, i, i + 2, i + 4, &alpha, B, i + 6, A, i + 8, &beta, C, i + 10);
}

// exp over a dense [rows, cols] block in place (ATen's vectorised exp; inside the heads' parallel_for it runs
// on this thread).
template <typename T>
void exp_inplace(T* p, int64_t rows, int64_t cols) {
  at::Tensor t = at::from_blob(p, {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  t.exp_();
}

// Query rows per tile: the four [R, Nk] blocks within ~512 KiB.
int64_t tile_rows(int64_t nq, int64_t nk, size_t elem) {
  const int64_t r = static_cast<int64_t>((512 * 1024) / (4 * elem * static_cast<size_t>(nk)));
  return std::min(nq, std::max<int64_t>(16, r));
}

template <typename T>
const T* head_ptr(const cpu::AttnArgs& a, int i, int64_t b, int64_t h) {
  return static_cast<const T*>(a.in[i]) + b * a.stride[i][0] + h * a.stride[i][1];
}

template <typename T>
void fwd_heads(const cpu::AttnArgs& a, int64_t bh0, int64_t bh1) {
  const int64_t nq = a.Nq, nk = a.Nk, d = a.D, dv = a.Dv;
  const T s = static_cast<T>(a.scale);
  const int64_t R = tile_rows(nq, nk, sizeof(T));
  std::vector<T> buf(static_cast<size_t>(2 * R * nk));
  T* E = buf.data();
  T* SD = E + R * nk;
  std::vector<T> lrow(static_cast<size_t>(R));
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / a.H, h = bh % a.H;
    const T *q = head_ptr<T>(a, 0, b, h), *k = head_ptr<T>(a, 1, b, h), *v = head_ptr<T>(a, 2, b, h);
    const T *qd = head_ptr<T>(a, 3, b, h), *kd = head_ptr<T>(a, 4, b, h), *vd = head_ptr<T>(a, 5, b, h);
    const int64_t qs = a.stride[0][2], ks = a.stride[1][2], vs = a.stride[2][2];
    const int64_t qds = a.stride[3][2], kds = a.stride[4][2], vds = a.stride[5][2];
    T* o = static_cast<T*>(a.out[0]) + bh * nq * dv;
    T* od = static_cast<T*>(a.out[1]) + bh * nq * dv;
    T* lse = static_cast<T*>(a.lse) + bh * nq;
    T* mu = static_cast<T*>(a.mu) + bh * nq;
    for (int64_t i0 = 0; i0 < nq; i0 += R) {
      const int64_t r = std::min(R, nq - i0);
      mm<T>(false, true, r, nk, d, s, q + i0 * qs, qs, k, ks, T(0), E, nk);  // S
      for (int64_t i = 0; i < r; ++i) {
        T* e = E + i * nk;
        T m = e[0];
        for (int64_t j = 1; j < nk; ++j) m = std::max(m, e[j]);
        for (int64_t j = 0; j < nk; ++j) e[j] -= m;
        lse[i0 + i] = m;
      }
      exp_inplace(E, r, nk);
      mm<T>(false, true, r, nk, d, s, qd + i0 * qds, qds, k, ks, T(0), SD, nk);  // Sd = s qd k^T
      mm<T>(false, true, r, nk, d, s, q + i0 * qs, qs, kd, kds, T(1), SD, nk);   //    + s q kd^T
      for (int64_t i = 0; i < r; ++i) {
        const T* e = E + i * nk;
        T* sd = SD + i * nk;
        T l = 0, esd = 0;
        for (int64_t j = 0; j < nk; ++j) {
          l += e[j];
          esd += e[j] * sd[j];
        }
        const T mui = esd / l;
        for (int64_t j = 0; j < nk; ++j) sd[j] = e[j] * (sd[j] - mui);  // E (Sd - mu)
        lrow[i] = l;
        mu[i0 + i] = mui;
        lse[i0 + i] += std::log(l);
      }
      T* ot = o + i0 * dv;
      T* odt = od + i0 * dv;
      mm<T>(false, false, r, dv, nk, T(1), E, nk, v, vs, T(0), ot, dv);      // E v
      mm<T>(false, false, r, dv, nk, T(1), E, nk, vd, vds, T(0), odt, dv);   // E vd
      mm<T>(false, false, r, dv, nk, T(1), SD, nk, v, vs, T(1), odt, dv);    //    + E (Sd - mu) v
      for (int64_t i = 0; i < r; ++i) {
        const T rl = T(1) / lrow[i];
        for (int64_t c = 0; c < dv; ++c) {
          ot[i * dv + c] *= rl;
          odt[i * dv + c] *= rl;
        }
      }
    }
  }
}

template <typename T>
void bwd_heads(const cpu::AttnArgs& a, int64_t bh0, int64_t bh1) {
  const int64_t nq = a.Nq, nk = a.Nk, d = a.D, dv = a.Dv;
  const T s = static_cast<T>(a.scale);
  const bool has_g = a.in[8] != nullptr, has_gd = a.in[9] != nullptr;
  const int64_t R = tile_rows(nq, nk, sizeof(T));
  std::vector<T> buf(static_cast<size_t>(4 * R * nk));
  T *P = buf.data(), *TT = P + R * nk, *C = TT + R * nk, *A = C + R * nk;
  std::vector<T> delta(static_cast<size_t>(R)), alpha(static_cast<size_t>(R));
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / a.H, h = bh % a.H;
    const T *q = head_ptr<T>(a, 0, b, h), *k = head_ptr<T>(a, 1, b, h), *v = head_ptr<T>(a, 2, b, h);
    const T *qd = head_ptr<T>(a, 3, b, h), *kd = head_ptr<T>(a, 4, b, h), *vd = head_ptr<T>(a, 5, b, h);
    const T *o = head_ptr<T>(a, 6, b, h), *od = head_ptr<T>(a, 7, b, h);
    const T* g = has_g ? head_ptr<T>(a, 8, b, h) : nullptr;
    const T* gd = has_gd ? head_ptr<T>(a, 9, b, h) : nullptr;
    const int64_t qs = a.stride[0][2], ks = a.stride[1][2], vs = a.stride[2][2];
    const int64_t qds = a.stride[3][2], kds = a.stride[4][2], vds = a.stride[5][2];
    const int64_t os = a.stride[6][2], ods = a.stride[7][2];
    const int64_t gs = has_g ? a.stride[8][2] : 0, gds = has_gd ? a.stride[9][2] : 0;
    const T* lse = static_cast<const T*>(a.lse) + bh * nq;
    const T* mu = static_cast<const T*>(a.mu) + bh * nq;
    T* dq = static_cast<T*>(a.out[0]) + bh * nq * d;
    T* dk = static_cast<T*>(a.out[1]) + bh * nk * d;
    T* dvv = static_cast<T*>(a.out[2]) + bh * nk * dv;
    T* dqd = has_gd ? static_cast<T*>(a.out[3]) + bh * nq * d : nullptr;
    T* dkd = has_gd ? static_cast<T*>(a.out[4]) + bh * nk * d : nullptr;
    T* dvd = has_gd ? static_cast<T*>(a.out[5]) + bh * nk * dv : nullptr;
    std::memset(dk, 0, sizeof(T) * nk * d);
    std::memset(dvv, 0, sizeof(T) * nk * dv);
    if (has_gd) {
      std::memset(dkd, 0, sizeof(T) * nk * d);
      std::memset(dvd, 0, sizeof(T) * nk * dv);
    }
    for (int64_t i0 = 0; i0 < nq; i0 += R) {
      const int64_t r = std::min(R, nq - i0);
      const T *qt = q + i0 * qs, *qdt = qd + i0 * qds;
      const T* gt = has_g ? g + i0 * gs : nullptr;
      const T* gdt = has_gd ? gd + i0 * gds : nullptr;
      for (int64_t i = 0; i < r; ++i) {  // per-row scalars
        const T *oi = o + (i0 + i) * os, *odi = od + (i0 + i) * ods;
        T dl = 0, al = 0;
        for (int64_t c = 0; c < dv; ++c) {
          if (has_g) dl += gt[i * gs + c] * oi[c];
          if (has_gd) {
            dl += gdt[i * gds + c] * odi[c];
            al += gdt[i * gds + c] * oi[c];
          }
        }
        delta[i] = dl;
        alpha[i] = al;
      }
      mm<T>(false, true, r, nk, d, s, qt, qs, k, ks, T(0), P, nk);  // S
      for (int64_t i = 0; i < r; ++i) {
        T* p = P + i * nk;
        const T l = lse[i0 + i];
        for (int64_t j = 0; j < nk; ++j) p[j] -= l;
      }
      exp_inplace(P, r, nk);  // P
      if (has_g) {
        mm<T>(false, true, r, nk, dv, T(1), gt, gs, v, vs, T(0), TT, nk);  // g v^T
        if (has_gd) mm<T>(false, true, r, nk, dv, T(1), gdt, gds, vd, vds, T(1), TT, nk);  // + gd vd^T
      } else {
        mm<T>(false, true, r, nk, dv, T(1), gdt, gds, vd, vds, T(0), TT, nk);
      }
      if (has_gd) {
        mm<T>(false, true, r, nk, d, s, qdt, qds, k, ks, T(0), C, nk);   // Sd = s qd k^T
        mm<T>(false, true, r, nk, d, s, qt, qs, kd, kds, T(1), C, nk);   //    + s q kd^T
        mm<T>(false, true, r, nk, dv, T(1), gdt, gds, v, vs, T(0), A, nk);  // gd v^T
        for (int64_t i = 0; i < r; ++i) {
          const T dl = delta[i], al = alpha[i], m = mu[i0 + i];
          const T* p = P + i * nk;
          T *t = TT + i * nk, *c = C + i * nk, *aa = A + i * nk;
          for (int64_t j = 0; j < nk; ++j) {
            const T cj = c[j] - m, aj = aa[j] - al;
            t[j] = p[j] * (t[j] - dl + aj * cj);  // dS
            aa[j] = p[j] * aj;                    // dSd
            c[j] = p[j] * cj;                     // P C
          }
        }
      } else {
        for (int64_t i = 0; i < r; ++i) {
          const T dl = delta[i];
          const T* p = P + i * nk;
          T* t = TT + i * nk;
          for (int64_t j = 0; j < nk; ++j) t[j] = p[j] * (t[j] - dl);
        }
      }
      // Value side: dv += P^T g + (P C)^T gd, dvd += P^T gd.
      if (has_g) mm<T>(true, false, nk, dv, r, T(1), P, nk, gt, gs, T(1), dvv, dv);
      if (has_gd) {
        mm<T>(true, false, nk, dv, r, T(1), C, nk, gdt, gds, T(1), dvv, dv);
        mm<T>(true, false, nk, dv, r, T(1), P, nk, gdt, gds, T(1), dvd, dv);
      }
      // Query side (this tile's rows): dq = s (dS k + dSd kd), dqd = s dSd k.
      T* dqt = dq + i0 * d;
      mm<T>(false, false, r, d, nk, s, TT, nk, k, ks, T(0), dqt, d);
      if (has_gd) {
        mm<T>(false, false, r, d, nk, s, A, nk, kd, kds, T(1), dqt, d);
        mm<T>(false, false, r, d, nk, s, A, nk, k, ks, T(0), dqd + i0 * d, d);
      }
      // Key side: dk += s (dS^T q + dSd^T qd), dkd += s dSd^T q.
      mm<T>(true, false, nk, d, r, s, TT, nk, qt, qs, T(1), dk, d);
      if (has_gd) {
        mm<T>(true, false, nk, d, r, s, A, nk, qdt, qds, T(1), dk, d);
        mm<T>(true, false, nk, d, r, s, A, nk, qt, qs, T(1), dkd, d);
      }
    }
  }
}

}  // namespace

bool attention_blas_available() {
  return blas().s != nullptr && blas().d != nullptr;
}

namespace {
std::atomic<bool>& blas_enabled() {
  static std::atomic<bool> on{true};
  return on;
}
}  // namespace

bool attention_blas_enabled() { return attention_blas_available() && blas_enabled().load(std::memory_order_relaxed); }

// sgflow::_attention_blas: whether wide heads take the BLAS path now; with an argument, switch first (off: the
// vector kernels of attention_dual_cpu_kernels.h at every width). False where no BLAS was found.
bool attention_blas(std::optional<bool> enable) {
  if (enable.has_value()) blas_enabled().store(*enable);
  return attention_blas_enabled();
}

void attention_dual_fwd_blas(const cpu::AttnArgs& a) {
  TORCH_CHECK(attention_blas_available(), "sgflow::attention_dual_cpu: no BLAS (sgemm_/dgemm_) in this process");
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t b0, int64_t b1) {
    if (a.f64)
      fwd_heads<double>(a, b0, b1);
    else
      fwd_heads<float>(a, b0, b1);
  });
}

void attention_dual_bwd_blas(const cpu::AttnArgs& a) {
  TORCH_CHECK(attention_blas_available(), "sgflow::attention_dual_cpu: no BLAS (sgemm_/dgemm_) in this process");
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t b0, int64_t b1) {
    if (a.f64)
      bwd_heads<double>(a, b0, b1);
    else
      bwd_heads<float>(a, b0, b1);
  });
}

}  // namespace sgflow
