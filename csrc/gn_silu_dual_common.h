// Argument checks and layout preparation shared by the CPU and CUDA torch bindings of
// sgflow::gn_silu_dual_{fwd,fwd_out,bwd,bwd_out} (schemas in sgflow_ops.cpp).
//
// The kernels take contiguous NCHW-like [B, C, S] buffers. Inputs of any strides (channels-last,
// transposed, sliced) are accepted and made contiguous here, which copies them when they are not;
// outputs are always contiguous [B, C, *spatial] (as the torch backend's).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

#include "gn_silu_dual_args.h"

namespace sgflow {

// Accumulation (and statistics) dtype: fp64 for fp64 inputs, fp32 for everything else.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

struct GnShape {
  int64_t B, C, S, G;
};

inline GnShape check_inputs(const char* op, const at::Tensor& x, const at::Tensor& x_dot,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            int64_t num_groups, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape [B, C, *spatial], got ", x.sizes());
  TORCH_CHECK(x_dot.sizes() == x.sizes(), op, ": x_dot shape ", x_dot.sizes(), " does not match x shape ",
              x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x_dot.scalar_type() == dt, op, ": x_dot dtype ", x_dot.scalar_type(), " does not match x dtype ", dt);
  TORCH_CHECK(x_dot.device() == x.device(), op, ": x_dot is on ", x_dot.device(), " but x is on ", x.device());
  TORCH_CHECK(num_groups > 0, op, ": num_groups must be positive, got ", num_groups);
  const int64_t C = x.size(1);
  TORCH_CHECK(C % num_groups == 0, op, ": number of channels C=", C, " is not divisible by num_groups=",
              num_groups);
  for (const auto* p : {&weight, &bias}) {
    if (!p->has_value()) continue;
    const auto& t = p->value();
    const char* name = p == &weight ? "weight" : "bias";
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [", C, "], got ", t.sizes());
    TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be floating point, got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  }
  if (mask.has_value()) {
    const auto& m = mask.value();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.sizes() == x.sizes(), op,
                ": mask must be a bool tensor of x's shape ", x.sizes(), ", got ", m.scalar_type(), " ",
                m.sizes());
    TORCH_CHECK(m.device() == x.device(), op, ": mask is on ", m.device(), " but x is on ", x.device());
  }
  int64_t spatial = 1;  // product of the spatial sizes (1 for [B, C])
  for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
  return GnShape{x.size(0), C, spatial, num_groups};
}

// gamma / beta as contiguous [C] tensors of the accumulation dtype (undefined when absent: 1 / 0).
inline at::Tensor affine_arg(const std::optional<at::Tensor>& p, at::ScalarType acc) {
  if (!p.has_value()) return at::Tensor();
  return p->to(acc).contiguous();
}

inline at::Tensor opt_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

inline void check_cotangent(const char* op, const char* name, const std::optional<at::Tensor>& g,
                            const at::Tensor& x) {
  if (!g.has_value()) return;
  TORCH_CHECK(g->sizes() == x.sizes(), op, ": ", name, " shape ", g->sizes(), " does not match x shape ",
              x.sizes());
  TORCH_CHECK(g->device() == x.device(), op, ": ", name, " is on ", g->device(), " but x is on ", x.device());
  TORCH_CHECK(g->is_floating_point(), op, ": ", name, " must be floating point, got ", g->scalar_type());
}

inline void check_stats(const char* op, const at::Tensor& stats, const GnShape& sh, const at::Tensor& x) {
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == 4 && stats.size(1) == sh.B && stats.size(2) == sh.G, op,
              ": stats must have shape [4, ", sh.B, ", ", sh.G, "], got ", stats.sizes());
  TORCH_CHECK(stats.device() == x.device(), op, ": stats is on ", stats.device(), " but x is on ", x.device());
}

// `out` of the *_out ops: a contiguous [2B, C, *spatial] buffer of x's dtype; the first B samples get
// the primal result, the last B the tangent one (the stacked layout a following conv consumes).
inline void check_out(const char* op, const at::Tensor& out, const at::Tensor& x) {
  auto want = x.sizes().vec();
  want[0] *= 2;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(want), op, ": out must have shape ", at::IntArrayRef(want),
              ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out dtype ", out.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  TORCH_CHECK(out.device() == x.device(), op, ": out is on ", out.device(), " but x is on ", x.device());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
}

inline GnDtype gn_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return GnDtype::f32;
    case at::kDouble: return GnDtype::f64;
    case at::kBFloat16: return GnDtype::bf16;
    case at::kHalf: return GnDtype::f16;
    default: TORCH_CHECK(false, "sgflow: no GroupNorm-SiLU kernel for dtype ", t);
  }
}

// The argument blocks of the kernels from prepared (contiguous, kernel-dtype) tensors. The inputs and the
// shape are common to both blocks (GnFwdArgs and GnBwdArgs).
template <typename Args>
inline void set_common(Args& a, const GnShape& sh, const at::Tensor& x, const at::Tensor& xd, const at::Tensor& w,
                       const at::Tensor& b, const at::Tensor& mask, double drop_scale) {
  a.x = x.const_data_ptr();
  a.x_dot = xd.const_data_ptr();
  a.weight = w.defined() ? w.const_data_ptr() : nullptr;
  a.bias = b.defined() ? b.const_data_ptr() : nullptr;
  a.mask = mask.defined() ? static_cast<const uint8_t*>(mask.const_data_ptr()) : nullptr;
  a.drop_scale = drop_scale;
  a.B = sh.B;
  a.C = sh.C;
  a.S = sh.S;
  a.G = sh.G;
}

inline GnFwdArgs fwd_args(const GnShape& sh, const at::Tensor& x, const at::Tensor& xd, const at::Tensor& w,
                          const at::Tensor& b, const at::Tensor& mask, double drop_scale, double eps,
                          const at::Tensor& y, const at::Tensor& yd, const at::Tensor& stats) {
  GnFwdArgs a{};
  set_common(a, sh, x, xd, w, b, mask, drop_scale);
  a.y = y.data_ptr();
  a.y_dot = yd.data_ptr();
  a.stats = stats.data_ptr();
  a.eps = eps;
  return a;
}

inline GnBwdArgs bwd_args(const GnShape& sh, const at::Tensor& x, const at::Tensor& xd, const at::Tensor& w,
                          const at::Tensor& b, const at::Tensor& stats, const at::Tensor& g_y,
                          const at::Tensor& g_yd, const at::Tensor& mask, double drop_scale, const at::Tensor& g_x,
                          const at::Tensor& g_xd, const at::Tensor& part_w, const at::Tensor& part_b) {
  GnBwdArgs a{};
  set_common(a, sh, x, xd, w, b, mask, drop_scale);
  a.stats = stats.const_data_ptr();
  a.g_y = g_y.defined() ? g_y.const_data_ptr() : nullptr;
  a.g_y_dot = g_yd.defined() ? g_yd.const_data_ptr() : nullptr;
  a.g_x = g_x.data_ptr();
  a.g_x_dot = g_yd.defined() ? g_xd.data_ptr() : nullptr;
  a.g_weight_part = part_w.data_ptr();
  a.g_bias_part = part_b.data_ptr();
  return a;
}

// The four ops on top of a device's kernels. `Device` provides
//   static constexpr bool widen_half;   // run fp16 on widened fp32 copies (no fp16 kernel)
//   static void fwd(const GnShape&, x, x_dot, w, b, mask, drop_scale, eps, y, y_dot, stats);
//   static std::tuple<Tensor, Tensor> bwd(const GnShape&, x, x_dot, w, b, stats, g_y, g_y_dot, mask,
//                                         drop_scale, g_x, g_x_dot);   // -> g_weight, g_bias
// all tensors contiguous, of the kernel dtype (w, b, stats: accumulation dtype; absent = undefined).
template <typename Device>
struct GnOps {
  static at::ScalarType compute_dtype(at::ScalarType t) {
    return Device::widen_half && t == at::kHalf ? at::kFloat : t;
  }

  static at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) {
    return t.defined() ? t.to(ct).contiguous() : t;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(
      const at::Tensor& x, const at::Tensor& x_dot, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, int64_t num_groups, double eps, const std::optional<at::Tensor>& mask,
      double drop_scale, const at::Tensor* out) {
    const char* op = out ? "sgflow::gn_silu_dual_fwd_out" : "sgflow::gn_silu_dual_fwd";
    const GnShape sh = check_inputs(op, x, x_dot, weight, bias, num_groups, mask);
    if (out) check_out(op, *out, x);
    const auto ct = compute_dtype(x.scalar_type());
    const auto acc = acc_dtype(x.scalar_type());
    const at::Tensor xc = as_compute(x, ct), xdc = as_compute(x_dot, ct);
    const at::Tensor w = affine_arg(weight, acc), b = affine_arg(bias, acc), m = opt_contiguous(mask);
    at::Tensor stats = at::empty({4, sh.B, sh.G}, x.options().dtype(acc));
    at::Tensor y, yd;
    if (out && ct == x.scalar_type()) {  // the halves of a contiguous buffer along dim 0 are contiguous
      y = out->narrow(0, 0, sh.B);
      yd = out->narrow(0, sh.B, sh.B);
    } else {
      y = at::empty(x.sizes(), x.options().dtype(ct));
      yd = at::empty(x.sizes(), x.options().dtype(ct));
    }
    Device::fwd(sh, xc, xdc, w, b, m, drop_scale, eps, y, yd, stats);  // empty groups get NaN statistics
    if (ct != x.scalar_type()) {
      if (out) {
        out->narrow(0, 0, sh.B).copy_(y);
        out->narrow(0, sh.B, sh.B).copy_(yd);
      } else {
        y = y.to(x.scalar_type());
        yd = yd.to(x.scalar_type());
      }
    }
    return {y, yd, stats};
  }

  static std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor> bwd_impl(
      const at::Tensor& x, const at::Tensor& x_dot, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& stats, const std::optional<at::Tensor>& g_y,
      const std::optional<at::Tensor>& g_y_dot, int64_t num_groups, const std::optional<at::Tensor>& mask,
      double drop_scale, const at::Tensor* out) {
    const char* op = out ? "sgflow::gn_silu_dual_bwd_out" : "sgflow::gn_silu_dual_bwd";
    const GnShape sh = check_inputs(op, x, x_dot, weight, bias, num_groups, mask);
    check_stats(op, stats, sh, x);
    check_cotangent(op, "g_y", g_y, x);
    check_cotangent(op, "g_y_dot", g_y_dot, x);
    if (out) check_out(op, *out, x);
    const auto ct = compute_dtype(x.scalar_type());
    const auto acc = acc_dtype(x.scalar_type());
    const auto acc_opts = x.options().dtype(acc);
    const at::Tensor xc = as_compute(x, ct), xdc = as_compute(x_dot, ct);
    const at::Tensor w = affine_arg(weight, acc), b = affine_arg(bias, acc), m = opt_contiguous(mask);
    // Contiguous cotangents of the compute dtype are used as they are: when they are the halves of
    // `out`, the kernels read each element of them before writing the gradient at the same place.
    const at::Tensor gy = g_y.has_value() ? as_compute(*g_y, ct) : at::Tensor();
    const at::Tensor gyd = g_y_dot.has_value() ? as_compute(*g_y_dot, ct) : at::Tensor();
    const bool has_gyd = gyd.defined();
    at::Tensor gx, gxd;
    if (out && ct == x.scalar_type()) {
      gx = out->narrow(0, 0, sh.B);
      if (has_gyd) gxd = out->narrow(0, sh.B, sh.B);
    } else {
      gx = at::empty(x.sizes(), x.options().dtype(ct));
      if (has_gyd) gxd = at::empty(x.sizes(), x.options().dtype(ct));
    }
    at::Tensor g_w, g_b;
    if (!gy.defined() && !has_gyd) {  // no cotangent: every gradient is zero
      gx.zero_();
      g_w = at::zeros({sh.C}, acc_opts);
      g_b = at::zeros({sh.C}, acc_opts);
    } else {
      std::tie(g_w, g_b) =
          Device::bwd(sh, xc, xdc, w, b, stats.to(acc).contiguous(), gy, gyd, m, drop_scale, gx, gxd);
    }
    if (ct != x.scalar_type()) {
      if (out) {
        out->narrow(0, 0, sh.B).copy_(gx);
        if (has_gyd) out->narrow(0, sh.B, sh.B).copy_(gxd);
      } else {
        gx = gx.to(x.scalar_type());
        if (has_gyd) gxd = gxd.to(x.scalar_type());
      }
    }
    std::optional<at::Tensor> gxd_opt;
    if (has_gyd) gxd_opt = gxd;
    return {gx, gxd_opt, g_w, g_b};
  }

  // -- the registered ops (schemas in sgflow_ops.cpp) ---------------------------------------------
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(
      const at::Tensor& x, const at::Tensor& x_dot, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, int64_t num_groups, double eps, const std::optional<at::Tensor>& mask,
      double drop_scale) {
    return fwd_impl(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale, nullptr);
  }

  static at::Tensor fwd_out(const at::Tensor& x, const at::Tensor& x_dot, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                            const std::optional<at::Tensor>& mask, double drop_scale, at::Tensor& out) {
    return std::get<2>(fwd_impl(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale, &out));
  }

  static std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor> bwd(
      const at::Tensor& x, const at::Tensor& x_dot, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& stats, const std::optional<at::Tensor>& g_y,
      const std::optional<at::Tensor>& g_y_dot, int64_t num_groups, const std::optional<at::Tensor>& mask,
      double drop_scale) {
    return bwd_impl(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask, drop_scale, nullptr);
  }

  static std::tuple<at::Tensor, at::Tensor> bwd_out(
      const at::Tensor& x, const at::Tensor& x_dot, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& stats, const std::optional<at::Tensor>& g_y,
      const std::optional<at::Tensor>& g_y_dot, int64_t num_groups, const std::optional<at::Tensor>& mask,
      double drop_scale, at::Tensor& out) {
    auto r = bwd_impl(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask, drop_scale, &out);
    return {std::get<2>(r), std::get<3>(r)};
  }
};

}  // namespace sgflow
