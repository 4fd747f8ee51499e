// Schemas of the sgflow ops implemented in C++ (kernels: gn_silu_dual_cpu.cpp for CPU tensors,
// gn_silu_dual_cuda_binding.cpp for CUDA tensors when built with CUDA). Fake (meta) implementations,
// the forward's autograd formula (the backward op) and loop vmap rules are registered from Python
// (sgflow/ops/cpp_ext.py); the torch and Triton backends register twins of these schemas
// (gn_silu_dual_*_torch, gn_silu_dual_*_triton) in sgflow/ops/gn_silu_library.py;
// tests/ops/test_schemas.py checks that all three agree.
//
// Contracts (the same as the torch backend's _gn_silu_dual_fwd_torch / _gn_silu_dual_bwd_torch):
//   x, x_dot: [B, C, *spatial] f32/f64/bf16/f16, any strides; weight, bias: [C] or None;
//   mask: bool [B, C, *spatial] dropout keep-mask applied as mask * drop_scale to both streams;
//   stats: [4, B, G] fp32 (fp64 for fp64 x): mean, rstd, mean_dot, rstd_dot of each (sample, group).
//   gn_silu_dual_fwd     -> y, y_dot (contiguous, x's dtype), stats
//   gn_silu_dual_fwd_out -> stats; y written to out[:B], y_dot to out[B:] (out: contiguous [2B, ...])
//   gn_silu_dual_bwd     -> g_x, g_x_dot (None when g_y_dot is None), g_weight, g_bias ([C], fp32 /
//                           fp64: the caller casts them and drops those of absent parameters)
//   gn_silu_dual_bwd_out -> g_weight, g_bias; g_x written to out[:B], g_x_dot to out[B:] (if g_y_dot).
//                           out may be the buffer whose halves are g_y and g_y_dot themselves.
#include <torch/library.h>

#include <optional>
#include <string>

namespace sgflow {
std::string cpu_isa(const std::optional<std::string>& isa);
bool attention_blas(std::optional<bool> enable);
}

TORCH_LIBRARY(sgflow, m) {
  m.def(
      "gn_silu_dual_fwd(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, int num_groups, float eps, "
      "Tensor? mask=None, float drop_scale=1.0) -> (Tensor y, Tensor y_dot, Tensor stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "gn_silu_dual_fwd_out(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, int num_groups, float eps, "
      "Tensor? mask, float drop_scale, Tensor(a!) out) -> Tensor stats",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "gn_silu_dual_bwd(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, Tensor stats, Tensor? g_y, "
      "Tensor? g_y_dot, int num_groups, Tensor? mask=None, float drop_scale=1.0) "
      "-> (Tensor g_x, Tensor? g_x_dot, Tensor g_weight, Tensor g_bias)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "gn_silu_dual_bwd_out(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, Tensor stats, Tensor? g_y, "
      "Tensor? g_y_dot, int num_groups, Tensor? mask, float drop_scale, Tensor(a!) out) "
      "-> (Tensor g_weight, Tensor g_bias)",
      {at::Tag::pt2_compliant_tag});
  // Dual elementwise ops (pointwise_dual_cpu.cpp, CPU f32/f64; kind "gelu_tanh" or "silu"):
  //   y = f(x), y_dot = f'(x) x_dot;  dx = g f'(x) + g_dot x_dot f''(x), dx_dot = g_dot f'(x).
  m.def("pointwise_dual_fwd(Tensor x, Tensor x_dot, str kind) -> (Tensor y, Tensor y_dot)",
        {at::Tag::pt2_compliant_tag});
  m.def("pointwise_dual_bwd(Tensor x, Tensor x_dot, Tensor? g, Tensor? g_dot, str kind) -> (Tensor dx, Tensor? dx_dot)",
        {at::Tag::pt2_compliant_tag});
  //   the same in place: dx into g, dx_dot into g_dot (both contiguous).
  m.def("pointwise_dual_bwd_(Tensor x, Tensor x_dot, Tensor(a!) g, Tensor(b!) g_dot, str kind) -> ()",
        {at::Tag::pt2_compliant_tag});
  // Dual product with a per-sample, per-channel factor (scale_dual_cpu.cpp, CPU f32/f64): x [B, R, C, K],
  // s [Bs, C] (Bs = B or 1) broadcast over R and K; y = x s, y_dot = x_dot s + x s_dot;
  // dx = g s + g_dot s_dot, dx_dot = g_dot s, ds = sum (g x + g_dot x_dot), ds_dot = sum g_dot x ([Bs, C]).
  m.def("scale_dual_fwd(Tensor x, Tensor x_dot, Tensor s, Tensor s_dot) -> (Tensor y, Tensor y_dot)",
        {at::Tag::pt2_compliant_tag});
  m.def("scale_dual_bwd(Tensor x, Tensor x_dot, Tensor s, Tensor s_dot, Tensor g, Tensor g_dot) "
        "-> (Tensor dx, Tensor dx_dot, Tensor ds, Tensor ds_dot)",
        {at::Tag::pt2_compliant_tag});
  // Dual softmax attention (attention_dual_cpu.cpp, CPU f32/f64; contracts of the torch backend's
  // attention_dual_{fwd,bwd}_torch, sgflow/ops/attention.py; empty tangent gradients without g_o_dot).
  m.def("attention_dual_fwd_cpu(Tensor q, Tensor k, Tensor v, Tensor q_dot, Tensor k_dot, Tensor v_dot, float scale) "
        "-> (Tensor o, Tensor o_dot, Tensor lse, Tensor mu)",
        {at::Tag::pt2_compliant_tag});
  m.def("attention_dual_bwd_cpu(Tensor q, Tensor k, Tensor v, Tensor q_dot, Tensor k_dot, Tensor v_dot, Tensor o, "
        "Tensor o_dot, Tensor lse, Tensor mu, Tensor? g_o, Tensor? g_o_dot, float scale) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dq_dot, Tensor dk_dot, Tensor dv_dot)",
        {at::Tag::pt2_compliant_tag});
  // Introspection for tests and benchmarks: the CPU kernels' instruction set (set it with an argument).
  m.def("_cpu_isa(str? isa=None) -> str", &sgflow::cpu_isa);
  // ... and whether the dual attention runs wide heads on the BLAS path (set it with an argument; tests run both).
  m.def("_attention_blas(bool? enable=None) -> bool", &sgflow::attention_blas);
}
