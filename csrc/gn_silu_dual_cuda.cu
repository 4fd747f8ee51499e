// CUDA kernels of the dual (primal + tangent) GroupNorm -> SiLU op (formulas in
// gn_silu_dual_cpu_kernels.h; launchers declared in gn_silu_dual_cuda.h).
//
// One block per (sample, group): the group is CG*S contiguous elements, the block reduces its
// statistics itself (warp shuffles, then one fixed-order pass over the warps' partials in shared
// memory: deterministic, no atomics), so a launch needs no second kernel or workspace.
//
// One read of each group where it fits: when the group's cached values fit in shared memory (the
// device's opt-in limit), pass 1 keeps them there and pass 2 reads them back instead of global memory
// (forward: x, x_dot; backward: xh, x_dot - mean_dot and the two gamma-scaled cotangent terms a, c).
// A cifar10 group (8 channels x 32x32) takes 64 KB (forward) / 128 KB (backward) in fp32. Larger groups
// read the group twice (the second read mostly from L2) and the backward recomputes a and c.
//
// Statistics: shifted sums as on the CPU (sums of x - K, (x - K)^2, x_dot - K_dot, (x - K)(x_dot -
// K_dot) with K, K_dot the group's first elements), so the variance does not cancel when |mean| >>
// std; per thread they sum n / blockDim elements in the accumulation type (fp32 for fp32/fp16/bf16,
// fp64 for fp64), then a tree. The group statistics are derived in fp64.
//
// Per-channel parameter gradients (g_gamma, g_beta): channels are handed to teams of warps ("wpc"
// warps per channel when the block has more warps than the group has channels, else one warp per
// channel in turn), reduced with shuffles, written per warp to shared memory and summed in a fixed
// order: one [B, C] partial per sample, summed over the batch by the binding.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gn_silu_dual_cuda.h"

namespace sgflow::cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

// ---------------------------------------------------------------------------------------------------
// element access (A: accumulation type)
// ---------------------------------------------------------------------------------------------------
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double ld(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(double* p, int64_t i, double v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// sigmoid from e = exp(-|h|) <= 1: no overflow, and full relative precision for very negative h.
__device__ __forceinline__ float sigmoid_(float h) {
  const float e = expf(-fabsf(h));
  return (h >= 0.0f ? 1.0f : e) / (1.0f + e);
}
__device__ __forceinline__ double sigmoid_(double h) {
  const double e = exp(-fabs(h));
  return (h >= 0.0 ? 1.0 : e) / (1.0 + e);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums v[k] over the block; every thread gets the totals. `red` is [kMaxWarps][K] shared memory.
// The warps' partials are added in warp order by every thread: deterministic, and no broadcast sync.
template <typename A, int K>
__device__ __forceinline__ void block_sum(A (&v)[K], A (*red)[K]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) red[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A s = A(0);
    for (int w = 0; w < nw; ++w) s += red[w][k];
    v[k] = s;
  }
  __syncthreads();  // `red` may be reused after this
}

// Where thread threadIdx.x works in the channel loops: teams of `wpc` warps per channel.
struct Teams {
  int wpc, n_teams, team, wit, lt, size;
  __device__ Teams(int CG) {
    const int nw = blockDim.x >> 5, warp = threadIdx.x >> 5;
    wpc = CG >= nw ? 1 : nw / CG;
    n_teams = nw / wpc;       // warps past n_teams * wpc (when wpc does not divide nw) sit out
    team = warp / wpc;
    wit = warp % wpc;         // warp index inside the team
    lt = wit * 32 + (threadIdx.x & 31);
    size = wpc * 32;
  }
};

// ---------------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------------
template <typename T, bool CACHE>
__global__ void __launch_bounds__(kMaxThreads) fwd_kernel(const GnFwdArgs a) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red[kMaxWarps][4];
  const int G = static_cast<int>(a.G), CG = static_cast<int>(a.C / a.G), S = static_cast<int>(a.S);
  const int n = CG * S;
  const int64_t bg = blockIdx.x, BG = a.B * a.G, base = bg * n;
  const int g = static_cast<int>(bg % G);
  A* stats = static_cast<A*>(a.stats);
  if (n == 0) {
    if (threadIdx.x == 0)
      for (int k = 0; k < 4; ++k) stats[k * BG + bg] = A(NAN);  // mean of nothing, as torch.mean
    return;
  }
  const T* __restrict__ x = static_cast<const T*>(a.x) + base;
  const T* __restrict__ xd = static_cast<const T*>(a.x_dot) + base;
  A* cx = reinterpret_cast<A*>(smem);
  A* cxd = cx + n;

  // 1. statistics
  const A kx = ld(x, 0), kxd = ld(xd, 0);
  A v[4] = {A(0), A(0), A(0), A(0)};
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const A xv = ld(x, i), xdv = ld(xd, i);
    if constexpr (CACHE) {
      cx[i] = xv;
      cxd[i] = xdv;
    }
    const A dx = xv - kx, dxd = xdv - kxd;
    v[0] += dx;
    v[1] += dx * dx;
    v[2] += dxd;
    v[3] += dx * dxd;
  }
  block_sum<A, 4>(v, red);  // its syncs also publish the cache
  const double inv_n = 1.0 / n;
  const double m1 = double(v[0]) * inv_n, md1 = double(v[2]) * inv_n;
  const double var = double(v[1]) * inv_n - m1 * m1;
  const double cov = double(v[3]) * inv_n - m1 * md1;
  const double r = rsqrt((var > 0.0 ? var : 0.0) + a.eps);
  const A mean = A(double(kx) + m1), rstd = A(r), mean_dot = A(double(kxd) + md1), rstd_dot = A(-r * r * r * cov);
  if (threadIdx.x == 0) {
    stats[0 * BG + bg] = mean;
    stats[1 * BG + bg] = rstd;
    stats[2 * BG + bg] = mean_dot;
    stats[3 * BG + bg] = rstd_dot;
  }

  // 2. outputs (flat over the group; the channel of element i is i / S)
  const A* W = static_cast<const A*>(a.weight);
  const A* Bi = static_cast<const A*>(a.bias);
  const uint8_t* m = a.mask ? a.mask + base : nullptr;
  const A scale = A(a.drop_scale);
  T* y = static_cast<T*>(a.y) + base;
  T* yd = static_cast<T*>(a.y_dot) + base;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int ch = g * CG + i / S;
    const A w = W ? W[ch] : A(1), bb = Bi ? Bi[ch] : A(0);
    const A xv = CACHE ? cx[i] : ld(x, i), xdv = CACHE ? cxd[i] : ld(xd, i);
    const A d = xv - mean, dd = xdv - mean_dot;
    const A k1 = rstd * w;
    const A h = d * k1 + bb, hd = dd * k1 + d * (rstd_dot * w);
    const A sg = sigmoid_(h);
    A yv = h * sg, ydv = sg * (A(1) + h * (A(1) - sg)) * hd;
    if (m) {
      const A mk = A(m[i]) * scale;
      yv *= mk;
      ydv *= mk;
    }
    st(y, i, yv);
    st(yd, i, ydv);
  }
}

// ---------------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------------
// Per-element quantities of pass 1 (and of the uncached pass 2): xh, dd, a = gamma g_h, c = gamma
// g_hdot, and the per-channel terms g_h, g_h xh + g_hdot xh_dot.
template <typename A>
struct BwdElem {
  A xh, dd, av, cv, gh, gw;
};

template <typename T, typename A>
__device__ __forceinline__ BwdElem<A> bwd_elem(const T* x, const T* xd, const T* gy, const T* gyd,
                                               const uint8_t* m, int i, A w, A bb, A mean, A rstd, A mean_dot,
                                               A rstd_dot, A scale) {
  BwdElem<A> e;
  const A d = ld(x, i) - mean;
  e.dd = ld(xd, i) - mean_dot;
  e.xh = d * rstd;
  const A xhd = e.dd * rstd + d * rstd_dot;
  const A h = e.xh * w + bb, hd = xhd * w;
  const A sg = sigmoid_(h);
  const A sp = sg * (A(1) + h * (A(1) - sg));
  const A mk = m ? A(m[i]) * scale : A(1);
  A gh = gy ? ld(gy, i) * mk * sp : A(0), ghd = A(0);
  if (gyd) {
    const A gydv = ld(gyd, i) * mk;
    gh += gydv * (sg * (A(1) - sg) * (A(2) + h * (A(1) - A(2) * sg))) * hd;
    ghd = gydv * sp;
  }
  e.gh = gh;
  e.gw = gh * e.xh + ghd * xhd;
  e.av = w * gh;
  e.cv = w * ghd;
  return e;
}

template <typename T, bool CACHE>
__global__ void __launch_bounds__(kMaxThreads) bwd_kernel(const GnBwdArgs a) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ A red[kMaxWarps][5];
  const int G = static_cast<int>(a.G), CG = static_cast<int>(a.C / a.G), S = static_cast<int>(a.S);
  const int n = CG * S;
  const int64_t bg = blockIdx.x, BG = a.B * a.G, base = bg * n;
  const int64_t b = bg / G;
  const int g = static_cast<int>(bg % G);
  A* part_w = static_cast<A*>(a.g_weight_part) + b * a.C + int64_t(g) * CG;
  A* part_b = static_cast<A*>(a.g_bias_part) + b * a.C + int64_t(g) * CG;
  if (n == 0) {
    for (int c = threadIdx.x; c < CG; c += blockDim.x) part_w[c] = part_b[c] = A(0);
    return;
  }
  const A* st4 = static_cast<const A*>(a.stats);
  const A mean = st4[0 * BG + bg], rstd = st4[1 * BG + bg], mean_dot = st4[2 * BG + bg], rstd_dot = st4[3 * BG + bg];
  const A* W = static_cast<const A*>(a.weight);
  const A* Bi = static_cast<const A*>(a.bias);
  const A scale = A(a.drop_scale);
  const T* __restrict__ x = static_cast<const T*>(a.x) + base;
  const T* __restrict__ xd = static_cast<const T*>(a.x_dot) + base;
  // No __restrict__ on the cotangents: g_x / g_x_dot may be their very buffers.
  const T* gy = a.g_y ? static_cast<const T*>(a.g_y) + base : nullptr;
  const T* gyd = a.g_y_dot ? static_cast<const T*>(a.g_y_dot) + base : nullptr;
  const uint8_t* m = a.mask ? a.mask + base : nullptr;
  const Teams tm(CG);
  // shared memory: per-warp channel partials [CG][wpc][2], then the cache [4][n] (xh, dd, a, c)
  A* chpart = reinterpret_cast<A*>(smem);
  A* cache = chpart + 2 * CG * tm.wpc;

  // 1. one read of x, x_dot, g_y, g_ydot
  A gs[5] = {A(0), A(0), A(0), A(0), A(0)};  // sums of a, a xh, c, c xh, c dd
  if (tm.team < tm.n_teams) {
    for (int c = tm.team; c < CG; c += tm.n_teams) {
      const int ch = g * CG + c;
      const A w = W ? W[ch] : A(1), bb = Bi ? Bi[ch] : A(0);
      A pb = A(0), pw = A(0);
      for (int s = tm.lt; s < S; s += tm.size) {
        const int i = c * S + s;
        const BwdElem<A> e = bwd_elem<T, A>(x, xd, gy, gyd, m, i, w, bb, mean, rstd, mean_dot, rstd_dot, scale);
        pb += e.gh;
        pw += e.gw;
        gs[0] += e.av;
        gs[1] += e.av * e.xh;
        gs[2] += e.cv;
        gs[3] += e.cv * e.xh;
        gs[4] += e.cv * e.dd;
        if constexpr (CACHE) {
          cache[i] = e.xh;
          cache[n + i] = e.dd;
          cache[2 * n + i] = e.av;
          cache[3 * n + i] = e.cv;
        }
      }
      pb = warp_sum(pb);
      pw = warp_sum(pw);
      if ((threadIdx.x & 31) == 0) {
        chpart[(c * tm.wpc + tm.wit) * 2] = pb;
        chpart[(c * tm.wpc + tm.wit) * 2 + 1] = pw;
      }
    }
  }
  block_sum<A, 5>(gs, red);  // its syncs also publish chpart and the cache
  for (int c = threadIdx.x; c < CG; c += blockDim.x) {
    A sb = A(0), sw = A(0);
    for (int k = 0; k < tm.wpc; ++k) {
      sb += chpart[(c * tm.wpc + k) * 2];
      sw += chpart[(c * tm.wpc + k) * 2 + 1];
    }
    part_b[c] = sb;
    part_w[c] = sw;
  }

  // 2. input gradients: g_x = r a + r_dot c + q1 xh + q2 dd + q0, g_xdot = r c + p1 xh + p0
  const double inv_n = 1.0 / n, r = rstd, rd = rstd_dot;
  const double ma = double(gs[0]) * inv_n, max_ = double(gs[1]) * inv_n;
  const double mc = double(gs[2]) * inv_n, mcx = double(gs[3]) * inv_n, mcd = double(gs[4]) * inv_n;
  const A q1 = A(-r * max_ - r * r * mcd - 3.0 * rd * mcx), q2 = A(-r * r * mcx), q0 = A(-r * ma - rd * mc);
  const A p1 = A(-r * mcx), p0 = A(-r * mc);
  T* gx = static_cast<T*>(a.g_x) + base;
  T* gxd = gyd ? static_cast<T*>(a.g_x_dot) + base : nullptr;
  if constexpr (CACHE) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const A xh = cache[i], dd = cache[n + i], av = cache[2 * n + i], cv = cache[3 * n + i];
      st(gx, i, rstd * av + rstd_dot * cv + q1 * xh + q2 * dd + q0);
      if (gxd) st(gxd, i, rstd * cv + p1 * xh + p0);
    }
  } else {
    // Recompute a and c; each element's cotangents are read by the thread that then writes its
    // gradients, so g_x may overwrite g_y in place.
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int ch = g * CG + i / S;
      const A w = W ? W[ch] : A(1), bb = Bi ? Bi[ch] : A(0);
      const BwdElem<A> e = bwd_elem<T, A>(x, xd, gy, gyd, m, i, w, bb, mean, rstd, mean_dot, rstd_dot, scale);
      st(gx, i, rstd * e.av + rstd_dot * e.cv + q1 * e.xh + q2 * e.dd + q0);
      if (gxd) st(gxd, i, rstd * e.cv + p1 * e.xh + p0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------------
int threads_for(int64_t n) { return n >= 8192 ? 512 : (n >= 2048 ? 256 : 128); }

// Dynamic shared memory a block may use besides its static reduction arrays.
cudaError_t dynamic_smem_limit(size_t* limit) {
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  *limit = optin > 4096 ? static_cast<size_t>(optin) - 4096 : 0;
  return cudaSuccess;
}

// Launch `kernel` with `smem` bytes of dynamic shared memory (raising the kernel's limit above the
// default 48 KB when needed).
template <typename Kernel, typename Args>
cudaError_t launch(Kernel kernel, int64_t grid, int threads, size_t smem, cudaStream_t stream, const Args& args) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const GnFwdArgs& a, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t grid = a.B * a.G, n = (a.C / a.G) * a.S;
  if (grid == 0) return cudaSuccess;
  if (n > kMaxGroupElems || grid > 0x7fffffff) return cudaErrorInvalidValue;
  size_t limit = 0;
  const cudaError_t err = dynamic_smem_limit(&limit);
  if (err != cudaSuccess) return err;
  const size_t cache = 2 * static_cast<size_t>(n) * sizeof(A);
  const int threads = threads_for(n);
  if (cache <= limit) return launch(fwd_kernel<T, true>, grid, threads, cache, stream, a);
  return launch(fwd_kernel<T, false>, grid, threads, 0, stream, a);
}

template <typename T>
cudaError_t bwd_typed(const GnBwdArgs& a, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t grid = a.B * a.G, CG = a.C / a.G, n = CG * a.S;
  if (grid == 0) return cudaSuccess;
  if (n > kMaxGroupElems || grid > 0x7fffffff) return cudaErrorInvalidValue;
  size_t limit = 0;
  const cudaError_t err = dynamic_smem_limit(&limit);
  if (err != cudaSuccess) return err;
  const int threads = threads_for(n);
  const int64_t nw = threads / 32, wpc = CG >= nw ? 1 : nw / CG;
  const size_t parts = 2 * static_cast<size_t>(CG * wpc) * sizeof(A);
  const size_t cache = 4 * static_cast<size_t>(n) * sizeof(A);
  if (parts + cache <= limit) return launch(bwd_kernel<T, true>, grid, threads, parts + cache, stream, a);
  if (parts > limit) return cudaErrorInvalidConfiguration;  // > ~50K channels per group
  return launch(bwd_kernel<T, false>, grid, threads, parts, stream, a);
}

}  // namespace

cudaError_t gn_silu_dual_fwd(GnDtype dtype, const GnFwdArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case GnDtype::f32: return fwd_typed<float>(args, stream);
    case GnDtype::f64: return fwd_typed<double>(args, stream);
    case GnDtype::f16: return fwd_typed<__half>(args, stream);
    case GnDtype::bf16: return fwd_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gn_silu_dual_bwd(GnDtype dtype, const GnBwdArgs& args, cudaStream_t stream) {
  if (!args.g_y && !args.g_y_dot) return cudaErrorInvalidValue;
  switch (dtype) {
    case GnDtype::f32: return bwd_typed<float>(args, stream);
    case GnDtype::f64: return bwd_typed<double>(args, stream);
    case GnDtype::f16: return bwd_typed<__half>(args, stream);
    case GnDtype::bf16: return bwd_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sgflow::cuda
