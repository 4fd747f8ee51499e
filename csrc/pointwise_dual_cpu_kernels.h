// CPU kernels of the dual elementwise ops (tanh-GELU, SiLU), instantiated once per instruction set.
//
// No include guard on purpose, like gn_silu_dual_cpu_kernels.h, which a translation unit includes first
// (same SGFLOW_ISA, same target pragma): its load/store, exp_nonpos and sigmoid are reused from there.
// Defines sgflow::cpu::SGFLOW_ISA::pointwise_dual_fwd / pointwise_dual_bwd (pointwise_dual_cpu.h).
//
// Math, per element (f, f', f'' of the op; one pass, every factor computed once):
//   forward:  y = f(x),  y_dot = f'(x) x_dot
//   backward: dx = g f'(x) + g_dot x_dot f''(x),  dx_dot = g_dot f'(x)      (g or g_dot may be absent)
// tanh-GELU, c = sqrt(2/pi), a = 0.044715, z = c (x + a x^3), T = tanh z, S = 1 - T^2, u = c (1 + 3 a x^2):
//   f = x (1 + T) / 2,  f' = (1 + T) / 2 + x S u / 2,  f'' = S (u - x T u^2 + 3 c a x^2)
//   T = sign(z) (1 - e) / (1 + e), e = exp(-2|z|) <= 1 (no overflow; absolute error ~1 ulp, which is what
//   every use of T here needs: it enters as 1 + T or times x).
// SiLU, s = sigmoid(x):  f = x s,  f' = s (1 + x (1 - s)),  f'' = s (1 - s) (2 + x (1 - 2 s))
//
// The loops are `#pragma omp simd` over contiguous spans of plain arithmetic (exp_nonpos is a polynomial
// with bit casts), so each ISA copy vectorises; ATen's tanh-GELU backward kernel took ~2.7 ns per element
// on one AVX-512 thread (benchmarks/NOTES.md).

#ifndef SGFLOW_ISA
#error "define SGFLOW_ISA before including pointwise_dual_cpu_kernels.h"
#endif

namespace sgflow::cpu::SGFLOW_ISA {
namespace {

template <typename A>
struct GeluTanh {
  // f, f', f'' at x (f'' only where asked).
  static inline void eval(A x, A& f, A& d1, A& d2, bool want_d2) {
    const A c = A(0.79788456080286535588), a = A(0.044715);
    const A x2 = x * x;
    const A z = c * x * (A(1) + a * x2);
    const A e = exp_nonpos(A(-2) * abs_(z));
    const A t0 = (A(1) - e) / (A(1) + e);
    const A t = z < A(0) ? -t0 : t0;
    const A s = A(1) - t * t;
    const A u = c * (A(1) + A(3) * a * x2);
    f = A(0.5) * x * (A(1) + t);
    d1 = A(0.5) * (A(1) + t) + A(0.5) * x * s * u;
    if (want_d2) d2 = s * (u - x * t * u * u + A(3) * c * a * x2);
  }
};

template <typename A>
struct Silu {
  static inline void eval(A x, A& f, A& d1, A& d2, bool want_d2) {
    const A s = sigmoid(x);
    f = x * s;
    d1 = s * (A(1) + x * (A(1) - s));
    if (want_d2) d2 = s * (A(1) - s) * (A(2) + x * (A(1) - A(2) * s));
  }
};

template <typename A, typename Op>
void fwd_span(const A* x, const A* xd, A* y, A* yd, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    A f, d1, d2;
    Op::eval(x[i], f, d1, d2, false);
    y[i] = f;
    yd[i] = d1 * xd[i];
  }
}

template <typename A, typename Op, bool G, bool GD>
void bwd_span(const A* x, const A* xd, const A* g, const A* gd, A* dx, A* dxd, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    A f, d1, d2 = A(0);
    Op::eval(x[i], f, d1, d2, GD);
    A v = A(0);
    if constexpr (G) v = g[i] * d1;
    if constexpr (GD) {
      v += gd[i] * xd[i] * d2;
      dxd[i] = gd[i] * d1;
    }
    dx[i] = v;
  }
}

template <typename A, typename Op>
void bwd_dispatch(const PwBwdArgs& a, int64_t begin, int64_t end) {
  const A *x = static_cast<const A*>(a.x), *xd = static_cast<const A*>(a.x_dot);
  const A *g = static_cast<const A*>(a.g), *gd = static_cast<const A*>(a.g_dot);
  A *dx = static_cast<A*>(a.dx), *dxd = static_cast<A*>(a.dx_dot);
  if (g && gd)
    bwd_span<A, Op, true, true>(x, xd, g, gd, dx, dxd, begin, end);
  else if (g)
    bwd_span<A, Op, true, false>(x, xd, g, gd, dx, dxd, begin, end);
  else
    bwd_span<A, Op, false, true>(x, xd, g, gd, dx, dxd, begin, end);
}

template <typename A>
void fwd_typed(const PwFwdArgs& a, int64_t begin, int64_t end) {
  const A *x = static_cast<const A*>(a.x), *xd = static_cast<const A*>(a.x_dot);
  A *y = static_cast<A*>(a.y), *yd = static_cast<A*>(a.y_dot);
  if (a.kind == PwKind::gelu_tanh)
    fwd_span<A, GeluTanh<A>>(x, xd, y, yd, begin, end);
  else
    fwd_span<A, Silu<A>>(x, xd, y, yd, begin, end);
}

template <typename A>
void bwd_typed(const PwBwdArgs& a, int64_t begin, int64_t end) {
  if (a.kind == PwKind::gelu_tanh)
    bwd_dispatch<A, GeluTanh<A>>(a, begin, end);
  else
    bwd_dispatch<A, Silu<A>>(a, begin, end);
}

}  // namespace

void pointwise_dual_fwd(const PwFwdArgs& a, int64_t begin, int64_t end) {
  if (a.f64)
    fwd_typed<double>(a, begin, end);
  else
    fwd_typed<float>(a, begin, end);
}

// Needs g or g_dot (the binding answers "neither" without calling it).
void pointwise_dual_bwd(const PwBwdArgs& a, int64_t begin, int64_t end) {
  if (a.f64)
    bwd_typed<double>(a, begin, end);
  else
    bwd_typed<float>(a, begin, end);
}

}  // namespace sgflow::cpu::SGFLOW_ISA
