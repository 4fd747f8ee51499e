// CPU kernels of the dual GroupNorm -> SiLU op, instantiated once per instruction set.
//
// No include guard on purpose: a translation unit defines SGFLOW_ISA (base / avx2 / avx512), sets the
// target (#pragma GCC target) and includes this file, which defines sgflow::cpu::SGFLOW_ISA::
// fwd_groups / bwd_groups. Everything here sits in that namespace (internal helpers in an unnamed one
// inside it) and calls no out-of-line std:: template, so the AVX2 / AVX-512 copies never leak into the
// baseline code through a shared inline symbol.
//
// Math (one (sample, group) of n = CG*S elements; <.> is the group mean):
//   mu = <x>, r = (<(x-mu)^2> + eps)^-1/2, mu_dot = <x_dot>, r_dot = -r^3 <(x-mu)(x_dot-mu_dot)>
//   d = x - mu, dd = x_dot - mu_dot, xh = r d, xh_dot = r dd + r_dot d
//   h = gamma xh + beta, h_dot = gamma xh_dot, s = sigmoid(h)
//   y = h s,  y_dot = silu'(h) h_dot,  silu'(h) = s (1 + h (1 - s))       (times the dropout mask)
// Backward for cotangents (g_y, g_ydot), already multiplied by the dropout mask:
//   silu''(h) = s (1 - s) (2 + h (1 - 2 s))
//   g_h = g_y silu'(h) + g_ydot silu''(h) h_dot,  g_hdot = g_ydot silu'(h)
//   g_gamma += sum(g_h xh + g_hdot xh_dot), g_beta += sum(g_h)          (per channel)
//   a = gamma g_h, c = gamma g_hdot
//   g_xdot = r (c - <c> - xh <c xh>)
//   g_x    = r (a - <a> - xh <a xh>) + r_dot (c - <c>) - xh (r^2 <c dd> + 3 r_dot <c xh>) - r^2 <c xh> dd
//
// Passes per group: the forward reads the group once for the statistics and once more to write y,
// y_dot (the second read hits the cache: a cifar10 group is 8192 elements, 64 KB of x and x_dot in
// fp32). The backward reads x, x_dot and the cotangents once, keeping g_h and g_hdot in a per-thread
// scratch (accumulation type, so bf16 loses nothing there), then reads x, x_dot (cached) and the
// scratch to write g_x, g_xdot; the cotangents are not read again, which is what lets g_x overwrite g_y
// in place.
//
// Numerics: the statistics come from ONE pass of shifted sums, sum(x-K), sum((x-K)^2), sum(xd-Kd),
// sum((x-K)(xd-Kd)) with K, Kd the group's first elements. Plain sums of x and x^2 lose the variance to
// cancellation when |mean| >> std (var = <x^2> - <x>^2); shifted by a sample of the group the sums
// are of order std and the cancellation factor is 1 + ((mu - K)/std)^2, O(1) for any data whose first
// element is a typical one. They are two-level: fp32 (for fp32/bf16) vector lanes within chunks of
// CHUNK elements, where each of the 4 (SSE) to 16 (AVX-512) lanes adds at most CHUNK/4 terms, and fp64
// across chunks, so the rounding does not grow with the group size. The backward's per-channel and
// group sums are built the same way. fp64 inputs accumulate in fp64 throughout.
//
// Vectorisation: every inner loop is `#pragma omp simd` over a contiguous span (a whole group, or one
// channel's S elements) with scalar per-channel coefficients; exp is the polynomial below, plain
// arithmetic and bit casts the compiler vectorises (a libm call would not be). The selects in it need
// -fno-trapping-math (setup.py) to be if-converted; with GCC's default the AVX2 loops stay scalar.

#include <cmath>
#include <cstdint>

#ifndef SGFLOW_ISA
#error "define SGFLOW_ISA before including gn_silu_dual_cpu_kernels.h"
#endif

namespace sgflow::cpu::SGFLOW_ISA {
namespace {

// Elements per chunk of the two-level sums (see the header comment).
constexpr int64_t CHUNK = 256;

// ---------------------------------------------------------------------------------------------------
// element access: T is float, double, or uint16_t holding bf16 bits; A the accumulation type
// ---------------------------------------------------------------------------------------------------
template <typename T>
struct AccOf { using type = T; };
template <>
struct AccOf<uint16_t> { using type = float; };

inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(p[i]) << 16);
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {
  // fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN instead of rounding to infinity.
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  p[i] = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// ---------------------------------------------------------------------------------------------------
// exp and sigmoid
// ---------------------------------------------------------------------------------------------------
// exp(x) for x <= 0: 2^k e^r with x = k ln2 + r, |r| <= ln2/2 (Cody-Waite: ln2 split in a part whose
// products with k are exact and a small rest). e^r by its Taylor polynomial: degree 7 leaves
// 0.347^8/8! = 5e-9 relative, below fp32 rounding; degree 13 leaves 4e-18 for fp64. k is rounded with
// the 1.5*2^p trick (the sum's last bits are the integer, so 2^k is built from them in the exponent
// field without a float->int conversion). x is clamped where 2^k stays normal, exp(-87) ~ 1.6e-38 and
// exp(-708) ~ 3e-308. Only x <= 0 (the sigmoid below never needs more) keeps it to one clamp: with
// both clamps GCC turned the selects into several blended paths and the AVX2 loops ran 2x slower.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float t = x * 1.44269504088896341f + magic;
  const float kf = t - magic;
  const float r = (x - kf * 0.693145751953125f) - kf * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // t = magic + k exactly (its ulp is 1), so the difference of the bit patterns is k.
  const uint32_t k = __builtin_bit_cast(uint32_t, t) - __builtin_bit_cast(uint32_t, magic);
  return p * __builtin_bit_cast(float, (k + 127u) << 23);
}

inline double exp_nonpos(double x) {
  x = x < -708.0 ? -708.0 : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double t = x * 1.4426950408889634074 + magic;
  const double kf = t - magic;
  const double r = (x - kf * 6.93147180369123816490e-01) - kf * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const uint64_t k = __builtin_bit_cast(uint64_t, t) - __builtin_bit_cast(uint64_t, magic);
  return p * __builtin_bit_cast(double, (k + 1023u) << 52);
}

// sigmoid(h) = 1 / (1 + e) for h >= 0 and e / (1 + e) for h < 0, with e = exp(-|h|) <= 1: never
// overflows, and keeps full relative precision of small sigmoids (very negative h).
// Typed |x| (the untyped __builtin_fabs would turn the float path into double arithmetic).
inline float abs_(float x) { return __builtin_fabsf(x); }
inline double abs_(double x) { return __builtin_fabs(x); }

template <typename A>
inline A sigmoid(A h) {
  const A e = exp_nonpos(-abs_(h));
  return (h >= A(0) ? A(1) : e) / (A(1) + e);
}

// ---------------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------------
template <typename T, bool MASK>
void fwd_group(const FwdArgs& a, int64_t bg) {
  using A = typename AccOf<T>::type;
  const int64_t G = a.G, CG = a.C / a.G, S = a.S, n = CG * S, BG = a.B * a.G;
  const int64_t g = bg % G;
  const int64_t base = bg * n;  // == (b*C + g*CG)*S
  A* stats = static_cast<A*>(a.stats);
  if (n == 0) {
    for (int k = 0; k < 4; ++k) stats[k * BG + bg] = A(NAN);  // mean of nothing, as torch.mean
    return;
  }
  const A* W = static_cast<const A*>(a.weight);
  const A* Bi = static_cast<const A*>(a.bias);

  // 1. statistics: one read of x, x_dot (shifted two-level sums, see the header comment)
  A mean, rstd, mean_dot, rstd_dot;
  {
    const T* __restrict x = static_cast<const T*>(a.x) + base;
    const T* __restrict xd = static_cast<const T*>(a.x_dot) + base;
    const A kx = load(x, 0), kxd = load(xd, 0);
    double s1 = 0, s2 = 0, t1 = 0, p = 0;
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
      const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;
      A c1 = 0, c2 = 0, c3 = 0, c4 = 0;
#pragma omp simd reduction(+ : c1, c2, c3, c4)
      for (int64_t i = i0; i < i1; ++i) {
        const A dx = load(x, i) - kx, dxd = load(xd, i) - kxd;
        c1 += dx;
        c2 += dx * dx;
        c3 += dxd;
        c4 += dx * dxd;
      }
      s1 += c1;
      s2 += c2;
      t1 += c3;
      p += c4;
    }
    const double inv_n = 1.0 / static_cast<double>(n);
    const double m1 = s1 * inv_n, md1 = t1 * inv_n;
    const double var = s2 * inv_n - m1 * m1;
    const double cov = p * inv_n - m1 * md1;
    const double r = 1.0 / std::sqrt((var > 0 ? var : 0.0) + a.eps);
    // Rounded to the accumulation type once: what is stored is what the backward will recompute
    // from, so forward and recomputed forward agree.
    mean = static_cast<A>(static_cast<double>(kx) + m1);
    rstd = static_cast<A>(r);
    mean_dot = static_cast<A>(static_cast<double>(kxd) + md1);
    rstd_dot = static_cast<A>(-r * r * r * cov);
    stats[0 * BG + bg] = mean;
    stats[1 * BG + bg] = rstd;
    stats[2 * BG + bg] = mean_dot;
    stats[3 * BG + bg] = rstd_dot;
  }

  // 2. outputs, channel by channel (gamma, beta are per channel)
  const A scale = static_cast<A>(a.drop_scale);
  for (int64_t c = 0; c < CG; ++c) {
    const int64_t ch = g * CG + c, off = base + c * S;
    const A w = W ? W[ch] : A(1), bb = Bi ? Bi[ch] : A(0);
    // h = gamma r d + beta, h_dot = gamma (r dd + r_dot d): centred differences, not x*(r gamma) +
    // const, which would cancel when |mean| >> std.
    const A k1 = rstd * w, kd = rstd_dot * w;
    const T* __restrict x = static_cast<const T*>(a.x) + off;
    const T* __restrict xd = static_cast<const T*>(a.x_dot) + off;
    const uint8_t* __restrict m = MASK ? a.mask + off : nullptr;
    T* __restrict y = static_cast<T*>(a.y) + off;
    T* __restrict yd = static_cast<T*>(a.y_dot) + off;
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      const A d = load(x, s) - mean, dd = load(xd, s) - mean_dot;
      const A h = d * k1 + bb, hd = dd * k1 + d * kd;
      const A sg = sigmoid(h);
      A yv = h * sg;
      A ydv = sg * (A(1) + h * (A(1) - sg)) * hd;
      if constexpr (MASK) {
        const A mk = static_cast<A>(m[s]) * scale;
        yv *= mk;
        ydv *= mk;
      }
      store(y, s, yv);
      store(yd, s, ydv);
    }
  }
}

template <typename T>
void fwd_range(const FwdArgs& a, int64_t begin, int64_t end) {
  for (int64_t bg = begin; bg < end; ++bg) {
    if (a.mask)
      fwd_group<T, true>(a, bg);
    else
      fwd_group<T, false>(a, bg);
  }
}

// ---------------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------------
template <typename T, bool MASK, bool GY, bool GYD>
void bwd_group(const BwdArgs& a, int64_t bg, typename AccOf<T>::type* scratch) {
  using A = typename AccOf<T>::type;
  const int64_t G = a.G, C = a.C, CG = C / G, S = a.S, n = CG * S, BG = a.B * G;
  const int64_t b = bg / G, g = bg % G;
  const int64_t base = bg * n;
  A* part_w = static_cast<A*>(a.g_weight_part) + b * C + g * CG;
  A* part_b = static_cast<A*>(a.g_bias_part) + b * C + g * CG;
  if (n == 0) {
    for (int64_t c = 0; c < CG; ++c) part_w[c] = part_b[c] = A(0);
    return;
  }
  const A* st = static_cast<const A*>(a.stats);
  const A mean = st[0 * BG + bg], rstd = st[1 * BG + bg];
  const A mean_dot = st[2 * BG + bg], rstd_dot = st[3 * BG + bg];
  const A* W = static_cast<const A*>(a.weight);
  const A* Bi = static_cast<const A*>(a.bias);
  const A scale = static_cast<A>(a.drop_scale);
  A* __restrict sa = scratch;      // g_h
  A* __restrict sc = scratch + n;  // g_hdot

  // 1. one read of x, x_dot, g_y, g_ydot. Per channel, the sums of g_h, g_h xh, g_hdot xh_dot, g_hdot,
  // g_hdot xh, g_hdot dd give g_beta, g_gamma and (times gamma) the group sums of a, a xh, c, c xh,
  // c dd; g_h and g_hdot go to the scratch for pass 2.
  double sum_a = 0, sum_axh = 0, sum_c = 0, sum_cxh = 0, sum_cdd = 0;
  A sgbuf[CHUNK];
  for (int64_t c = 0; c < CG; ++c) {
    const int64_t ch = g * CG + c, off = c * S;
    const A w = W ? W[ch] : A(1), bb = Bi ? Bi[ch] : A(0);
    const A k1 = rstd * w;
    const T* __restrict x = static_cast<const T*>(a.x) + base + off;
    const T* __restrict xd = static_cast<const T*>(a.x_dot) + base + off;
    const T* __restrict gy = GY ? static_cast<const T*>(a.g_y) + base + off : nullptr;
    const T* __restrict gyd = GYD ? static_cast<const T*>(a.g_y_dot) + base + off : nullptr;
    const uint8_t* __restrict m = MASK ? a.mask + base + off : nullptr;
    A* __restrict ca = sa + off;
    A* __restrict cc = sc + off;
    double c_gh = 0, c_ghxh = 0, c_ghdxhd = 0, c_ghd = 0, c_ghdxh = 0, c_ghddd = 0;
    for (int64_t s0 = 0; s0 < S; s0 += CHUNK) {
      const int64_t len = s0 + CHUNK < S ? CHUNK : S - s0;
      // The sigmoid in a loop of its own: its long dependency chain (exp, division) then overlaps
      // across many more iterations in the out-of-order window than inside the big loop below.
#pragma omp simd
      for (int64_t s = 0; s < len; ++s) sgbuf[s] = sigmoid((load(x, s0 + s) - mean) * k1 + bb);
      A p0 = 0, p1 = 0, p2 = 0, p3 = 0, p4 = 0, p5 = 0;
#pragma omp simd reduction(+ : p0, p1, p2, p3, p4, p5)
      for (int64_t s = 0; s < len; ++s) {
        const int64_t j = s0 + s;
        const A d = load(x, j) - mean, dd = load(xd, j) - mean_dot;
        const A xh = d * rstd, xhd = dd * rstd + d * rstd_dot;
        const A h = d * k1 + bb, hd = xhd * w;
        const A sg = sgbuf[s];
        const A u = sg - sg * sg;  // s (1 - s)
        const A sp = sg + h * u;   // silu'(h)
        const A mk = MASK ? static_cast<A>(m[j]) * scale : A(1);
        A gh = A(0), ghd = A(0);
        if constexpr (GY) gh = load(gy, j) * mk * sp;
        if constexpr (GYD) {
          const A gydv = load(gyd, j) * mk;
          gh += gydv * (u * (A(2) + h * (A(1) - A(2) * sg))) * hd;  // silu''(h) h_dot
          ghd = gydv * sp;
        }
        p0 += gh;
        p1 += gh * xh;
        ca[j] = gh;
        if constexpr (GYD) {
          p2 += ghd * xhd;
          p3 += ghd;
          p4 += ghd * xh;
          p5 += ghd * dd;
          cc[j] = ghd;
        }
      }
      c_gh += p0;
      c_ghxh += p1;
      c_ghdxhd += p2;
      c_ghd += p3;
      c_ghdxh += p4;
      c_ghddd += p5;
    }
    part_b[c] = static_cast<A>(c_gh);
    part_w[c] = static_cast<A>(c_ghxh + c_ghdxhd);
    const double wd = w;
    sum_a += wd * c_gh;
    sum_axh += wd * c_ghxh;
    sum_c += wd * c_ghd;
    sum_cxh += wd * c_ghdxh;
    sum_cdd += wd * c_ghddd;
  }

  // 2. input gradients from the group means, with a = gamma g_h and c = gamma g_hdot:
  // g_x = r a + r_dot c + q1 xh + q2 dd + q0 and g_xdot = r c + p1 xh + p0 collect the formulas of the
  // header comment into per-group coefficients.
  const double inv_n = 1.0 / static_cast<double>(n);
  const double r = rstd, rd = rstd_dot;
  const double ma = sum_a * inv_n, max_ = sum_axh * inv_n;
  const double mc = sum_c * inv_n, mcx = sum_cxh * inv_n, mcd = sum_cdd * inv_n;
  const A q1 = static_cast<A>(GYD ? -r * max_ - r * r * mcd - 3.0 * rd * mcx : -r * max_);
  const A q2 = static_cast<A>(-r * r * mcx);
  const A q0 = static_cast<A>(GYD ? -r * ma - rd * mc : -r * ma);
  const A p1 = static_cast<A>(-r * mcx);
  const A p0 = static_cast<A>(-r * mc);
  for (int64_t c = 0; c < CG; ++c) {
    const int64_t ch = g * CG + c, off = base + c * S;
    const A w = W ? W[ch] : A(1);
    const A kr = rstd * w, krd = rstd_dot * w;
    const T* __restrict x = static_cast<const T*>(a.x) + off;
    const A* __restrict ca = sa + c * S;
    T* __restrict gx = static_cast<T*>(a.g_x) + off;
    if constexpr (GYD) {
      const T* __restrict xd = static_cast<const T*>(a.x_dot) + off;
      const A* __restrict cc = sc + c * S;
      T* __restrict gxd = static_cast<T*>(a.g_x_dot) + off;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        const A xh = (load(x, s) - mean) * rstd, dd = load(xd, s) - mean_dot;
        store(gx, s, kr * ca[s] + krd * cc[s] + q1 * xh + q2 * dd + q0);
        store(gxd, s, kr * cc[s] + p1 * xh + p0);
      }
    } else {
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        const A xh = (load(x, s) - mean) * rstd;
        store(gx, s, kr * ca[s] + q1 * xh + q0);
      }
    }
  }
}

template <typename T, bool MASK>
void bwd_range_masked(const BwdArgs& a, int64_t begin, int64_t end, typename AccOf<T>::type* scratch) {
  const bool gy = a.g_y != nullptr, gyd = a.g_y_dot != nullptr;
  for (int64_t bg = begin; bg < end; ++bg) {
    if (gy && gyd)
      bwd_group<T, MASK, true, true>(a, bg, scratch);
    else if (gy)
      bwd_group<T, MASK, true, false>(a, bg, scratch);
    else
      bwd_group<T, MASK, false, true>(a, bg, scratch);
  }
}

template <typename T>
void bwd_range(const BwdArgs& a, int64_t begin, int64_t end, void* scratch) {
  using A = typename AccOf<T>::type;
  if (a.mask)
    bwd_range_masked<T, true>(a, begin, end, static_cast<A*>(scratch));
  else
    bwd_range_masked<T, false>(a, begin, end, static_cast<A*>(scratch));
}

}  // namespace

void fwd_groups(Dtype dtype, const FwdArgs& args, int64_t begin, int64_t end) {
  switch (dtype) {
    case Dtype::f32: fwd_range<float>(args, begin, end); break;
    case Dtype::f64: fwd_range<double>(args, begin, end); break;
    case Dtype::bf16: fwd_range<uint16_t>(args, begin, end); break;
    case Dtype::f16: break;  // widened to f32 by the binding
  }
}

// Needs g_y or g_y_dot (the binding answers "neither" with zeros without calling it).
void bwd_groups(Dtype dtype, const BwdArgs& args, int64_t begin, int64_t end, void* scratch) {
  switch (dtype) {
    case Dtype::f32: bwd_range<float>(args, begin, end, scratch); break;
    case Dtype::f64: bwd_range<double>(args, begin, end, scratch); break;
    case Dtype::bf16: bwd_range<uint16_t>(args, begin, end, scratch); break;
    case Dtype::f16: break;  // widened to f32 by the binding
  }
}

}  // namespace sgflow::cpu::SGFLOW_ISA
