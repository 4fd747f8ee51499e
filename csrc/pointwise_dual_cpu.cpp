// CPU binding of sgflow::pointwise_dual_{fwd,bwd}: the dual tanh-GELU / SiLU (formulas:
// pointwise_dual_cpu_kernels.h), threaded over contiguous element ranges, on the instruction set the
// GroupNorm -> SiLU kernels use (gn_silu_dual_cpu.cpp; SGFLOW_CPU_ISA, torch.ops.sgflow._cpu_isa).
//
// Contracts: x, x_dot (and g, g_dot) of one shape, f32 or f64, any strides (made contiguous here);
//   pointwise_dual_fwd(x, x_dot, kind)        -> y, y_dot            (contiguous, x's dtype)
//   pointwise_dual_bwd(x, x_dot, g, g_dot, kind) -> dx, dx_dot        (dx_dot None when g_dot is None;
//                                                                     dx zeros when both are None)
//   pointwise_dual_bwd_(x, x_dot, g, g_dot, kind) -> ()               (in place: dx into g, dx_dot into
//                                                                     g_dot; both given and contiguous)
// kind: "gelu_tanh" or "silu". Other dtypes and devices stay on the ATen path (sgflow/ops/pointwise.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "pointwise_dual_cpu.h"

namespace sgflow {
namespace {

using cpu::PwBwdArgs;
using cpu::PwFwdArgs;
using cpu::PwKind;

// Elements per parallel task: small tensors are not split over threads whose wake-up costs more.
constexpr int64_t kGrain = int64_t{1} << 15;

PwKind kind_of(const std::string& kind) {
  if (kind == "gelu_tanh") return PwKind::gelu_tanh;
  if (kind == "silu") return PwKind::silu;
  TORCH_CHECK(false, "sgflow::pointwise_dual: unknown kind '", kind, "' (expected gelu_tanh or silu)");
}

void check(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "sgflow::pointwise_dual: CPU tensors only, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "sgflow::pointwise_dual: float32 or float64 only, got ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
              "sgflow::pointwise_dual: ", name, " must match x in shape, dtype and device: ", t.sizes(), " ",
              t.scalar_type(), " vs ", x.sizes(), " ", x.scalar_type());
}

void run_fwd(const PwFwdArgs& a, int64_t begin, int64_t end) {
  switch (cpu::active_isa_index()) {
#ifdef SGFLOW_CPU_X86_DISPATCH
    case 2: return cpu::avx512::pointwise_dual_fwd(a, begin, end);
    case 1: return cpu::avx2::pointwise_dual_fwd(a, begin, end);
#endif
    default: return cpu::base::pointwise_dual_fwd(a, begin, end);
  }
}

void run_bwd(const PwBwdArgs& a, int64_t begin, int64_t end) {
  switch (cpu::active_isa_index()) {
#ifdef SGFLOW_CPU_X86_DISPATCH
    case 2: return cpu::avx512::pointwise_dual_bwd(a, begin, end);
    case 1: return cpu::avx2::pointwise_dual_bwd(a, begin, end);
#endif
    default: return cpu::base::pointwise_dual_bwd(a, begin, end);
  }
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x_in, const at::Tensor& xd_in, const std::string& kind) {
  check(x_in, xd_in, "x_dot");
  const at::Tensor x = x_in.contiguous(), xd = xd_in.contiguous();
  at::Tensor y = at::empty_like(x), yd = at::empty_like(x);
  const PwFwdArgs a{kind_of(kind), x.scalar_type() == at::kDouble, x.const_data_ptr(), xd.const_data_ptr(),
                    y.data_ptr(), yd.data_ptr()};
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) { run_fwd(a, begin, end); });
  return {y, yd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> bwd(const at::Tensor& x_in, const at::Tensor& xd_in,
                                                      const std::optional<at::Tensor>& g_in,
                                                      const std::optional<at::Tensor>& gd_in,
                                                      const std::string& kind) {
  check(x_in, xd_in, "x_dot");
  if (g_in) check(x_in, *g_in, "g");
  if (gd_in) check(x_in, *gd_in, "g_dot");
  const PwKind k = kind_of(kind);
  if (!g_in && !gd_in) return {at::zeros_like(x_in, at::MemoryFormat::Contiguous), std::nullopt};
  const at::Tensor x = x_in.contiguous(), xd = xd_in.contiguous();
  const at::Tensor g = g_in ? g_in->contiguous() : at::Tensor();
  const at::Tensor gd = gd_in ? gd_in->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x);
  std::optional<at::Tensor> dxd;
  if (gd_in) dxd = at::empty_like(x);
  const PwBwdArgs a{k, x.scalar_type() == at::kDouble, x.const_data_ptr(), xd.const_data_ptr(),
                    g_in ? g.const_data_ptr() : nullptr, gd_in ? gd.const_data_ptr() : nullptr, dx.data_ptr(),
                    dxd ? dxd->data_ptr() : nullptr};
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) { run_bwd(a, begin, end); });
  return {dx, dxd};
}

// Each element reads its g, g_dot before writing dx, dx_dot at the same index, so the cotangent buffers can
// take the gradients: a fused consumer's backward (sgflow.ops.conv_linear.PointwiseLinearDual) then holds two
// activation-sized buffers instead of four.
void bwd_inplace(const at::Tensor& x_in, const at::Tensor& xd_in, const at::Tensor& g, const at::Tensor& gd,
                 const std::string& kind) {
  check(x_in, xd_in, "x_dot");
  check(x_in, g, "g");
  check(x_in, gd, "g_dot");
  TORCH_CHECK(g.is_contiguous() && gd.is_contiguous(), "sgflow::pointwise_dual_bwd_: g and g_dot must be contiguous");
  const PwKind k = kind_of(kind);
  const at::Tensor x = x_in.contiguous(), xd = xd_in.contiguous();
  const PwBwdArgs a{k, x.scalar_type() == at::kDouble, x.const_data_ptr(), xd.const_data_ptr(), g.const_data_ptr(),
                    gd.const_data_ptr(), g.data_ptr(), gd.data_ptr()};
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) { run_bwd(a, begin, end); });
}

}  // namespace

TORCH_LIBRARY_IMPL(sgflow, CPU, m) {
  m.impl("pointwise_dual_fwd", &fwd);
  m.impl("pointwise_dual_bwd", &bwd);
  m.impl("pointwise_dual_bwd_", &bwd_inplace);
}

}  // namespace sgflow
