// CPU kernels of sgflow::scale_dual_{fwd,bwd}: the dual of a product with a per-sample, per-channel factor
// (an adaLN gate or scale, a FiLM multiplier): x viewed as [B, R, C, K] times s [Bs, C], broadcast over R
// and K (Bs is B, or 1 for a factor shared by the batch). Formulas and the Python side: sgflow/ops/scale.py.
//
//   scale_dual_fwd(x, x_dot, s, s_dot)          -> y = x s,  y_dot = x_dot s + x s_dot        ([B, R, C, K])
//   scale_dual_bwd(x, x_dot, s, s_dot, g, g_dot) -> dx = g s + g_dot s_dot,  dx_dot = g_dot s  ([B, R, C, K]),
//                                                  ds = sum_{b*,r,k} (g x + g_dot x_dot),
//                                                  ds_dot = sum_{b*,r,k} g_dot x               ([Bs, C];
//                                                  b* only where Bs = 1)
//
// Why a kernel: as ATen ops the dual product is 4 ops forward and ~12 backward (three MulBackward0 with
// their broadcast sums, the tangent's add), each a pass over an activation and most an allocation; here
// it is one pass each way (measured: benchmarks/NOTES.md, issue 18 part 13). Threaded over the batch; the
// sums accumulate in double per sample, then over the batch where the factor is shared.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

namespace sgflow {
namespace {

struct Dims {
  int64_t B, R, C, K, Bs;
};

Dims check(const at::Tensor& x, const at::Tensor& s, std::initializer_list<const at::Tensor*> like_x,
           const at::Tensor& s_dot) {
  TORCH_CHECK(x.dim() == 4, "sgflow::scale_dual: x must be [B, R, C, K], got ", x.sizes());
  TORCH_CHECK(s.dim() == 2, "sgflow::scale_dual: s must be [Bs, C], got ", s.sizes());
  TORCH_CHECK(x.device().is_cpu(), "sgflow::scale_dual: CPU tensors only, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "sgflow::scale_dual: float32 or float64 only, got ", x.scalar_type());
  const Dims d{x.size(0), x.size(1), x.size(2), x.size(3), s.size(0)};
  TORCH_CHECK(s.size(1) == d.C && (d.Bs == d.B || d.Bs == 1), "sgflow::scale_dual: s ", s.sizes(),
              " does not fit x ", x.sizes(), " (expected [", d.B, " or 1, ", d.C, "])");
  for (const at::Tensor* t : like_x)
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "sgflow::scale_dual: x_dot, g and g_dot must match x in shape, dtype and device: ", t->sizes(),
                " ", t->scalar_type(), " vs ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(s_dot.sizes() == s.sizes() && s_dot.scalar_type() == x.scalar_type() &&
                  s.scalar_type() == x.scalar_type() && s.device() == x.device() && s_dot.device() == x.device(),
              "sgflow::scale_dual: s and s_dot must be [Bs, C] of x's dtype and device: ", s.sizes(), " ",
              s.scalar_type(), ", ", s_dot.sizes(), " ", s_dot.scalar_type());
  return d;
}

template <typename T>
void fwd_samples(const Dims& d, const T* __restrict__ x, const T* __restrict__ xd, const T* __restrict__ s,
                 const T* __restrict__ sd, T* __restrict__ y, T* __restrict__ yd, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* sb = s + (d.Bs == 1 ? 0 : b * d.C);
    const T* sdb = sd + (d.Bs == 1 ? 0 : b * d.C);
    for (int64_t r = 0; r < d.R; ++r) {
      const int64_t o = (b * d.R + r) * d.C * d.K;
      if (d.K == 1) {  // channels last (a DiT's [B, N, C]): contiguous over c
        for (int64_t c = 0; c < d.C; ++c) {
          const T xv = x[o + c];
          y[o + c] = xv * sb[c];
          yd[o + c] = xd[o + c] * sb[c] + xv * sdb[c];
        }
      } else {  // channels first ([B, C, H, W]): contiguous over k
        for (int64_t c = 0; c < d.C; ++c) {
          const T sv = sb[c], sdv = sdb[c];
          const int64_t oc = o + c * d.K;
          for (int64_t k = 0; k < d.K; ++k) {
            const T xv = x[oc + k];
            y[oc + k] = xv * sv;
            yd[oc + k] = xd[oc + k] * sv + xv * sdv;
          }
        }
      }
    }
  }
}

// ps, psd: [B, C] per-sample partial sums of ds, ds_dot.
template <typename T>
void bwd_samples(const Dims& d, const T* __restrict__ x, const T* __restrict__ xd, const T* __restrict__ s,
                 const T* __restrict__ sd, const T* __restrict__ g, const T* __restrict__ gd, T* __restrict__ dx,
                 T* __restrict__ dxd, double* __restrict__ ps, double* __restrict__ psd, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* sb = s + (d.Bs == 1 ? 0 : b * d.C);
    const T* sdb = sd + (d.Bs == 1 ? 0 : b * d.C);
    double* acc = ps + b * d.C;
    double* accd = psd + b * d.C;
    for (int64_t c = 0; c < d.C; ++c) acc[c] = accd[c] = 0.0;
    for (int64_t r = 0; r < d.R; ++r) {
      const int64_t o = (b * d.R + r) * d.C * d.K;
      if (d.K == 1) {
        for (int64_t c = 0; c < d.C; ++c) {
          const T gv = g[o + c], gdv = gd[o + c], xv = x[o + c];
          dx[o + c] = gv * sb[c] + gdv * sdb[c];
          dxd[o + c] = gdv * sb[c];
          acc[c] += static_cast<double>(gv * xv + gdv * xd[o + c]);
          accd[c] += static_cast<double>(gdv * xv);
        }
      } else {
        for (int64_t c = 0; c < d.C; ++c) {
          const T sv = sb[c], sdv = sdb[c];
          const int64_t oc = o + c * d.K;
          T a = 0, ad = 0;  // one (r, c) row of K: summed in T, then into the double accumulator
          for (int64_t k = 0; k < d.K; ++k) {
            const T gv = g[oc + k], gdv = gd[oc + k], xv = x[oc + k];
            dx[oc + k] = gv * sv + gdv * sdv;
            dxd[oc + k] = gdv * sv;
            a += gv * xv + gdv * xd[oc + k];
            ad += gdv * xv;
          }
          acc[c] += static_cast<double>(a);
          accd[c] += static_cast<double>(ad);
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x_in, const at::Tensor& xd_in, const at::Tensor& s_in,
                                       const at::Tensor& sd_in) {
  const Dims d = check(x_in, s_in, {&xd_in}, sd_in);
  const at::Tensor x = x_in.contiguous(), xd = xd_in.contiguous(), s = s_in.contiguous(), sd = sd_in.contiguous();
  at::Tensor y = at::empty_like(x), yd = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scale_dual_fwd", [&] {
    at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
      fwd_samples<scalar_t>(d, x.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(),
                            s.const_data_ptr<scalar_t>(), sd.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            yd.data_ptr<scalar_t>(), b0, b1);
    });
  });
  return {y, yd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& x_in, const at::Tensor& xd_in,
                                                               const at::Tensor& s_in, const at::Tensor& sd_in,
                                                               const at::Tensor& g_in, const at::Tensor& gd_in) {
  const Dims d = check(x_in, s_in, {&xd_in, &g_in, &gd_in}, sd_in);
  const at::Tensor x = x_in.contiguous(), xd = xd_in.contiguous(), s = s_in.contiguous(), sd = sd_in.contiguous();
  const at::Tensor g = g_in.contiguous(), gd = gd_in.contiguous();
  at::Tensor dx = at::empty_like(x), dxd = at::empty_like(x);
  at::Tensor ps = at::empty({d.B, d.C}, x.options().dtype(at::kDouble));
  at::Tensor psd = at::empty({d.B, d.C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scale_dual_bwd", [&] {
    at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
      bwd_samples<scalar_t>(d, x.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(),
                            s.const_data_ptr<scalar_t>(), sd.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                            gd.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dxd.data_ptr<scalar_t>(),
                            ps.data_ptr<double>(), psd.data_ptr<double>(), b0, b1);
    });
  });
  if (d.Bs != d.B) {  // a shared factor (an empty batch included): the per-sample sums added up
    ps = ps.sum(0, /*keepdim=*/true);
    psd = psd.sum(0, /*keepdim=*/true);
  }
  return {dx, dxd, ps.to(x.scalar_type()), psd.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgflow, CPU, m) {
  m.impl("scale_dual_fwd", &fwd);
  m.impl("scale_dual_bwd", &bwd);
}

}  // namespace sgflow
