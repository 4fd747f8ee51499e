// CPU binding of sgflow::attention_dual_{fwd,bwd}_cpu: the dual softmax attention (formulas and loop
// structure: attention_dual_cpu_kernels.h), threaded over heads, on the instruction set the GroupNorm -> SiLU
// kernels use (gn_silu_dual_cpu.cpp; SGFLOW_CPU_ISA, torch.ops.sgflow._cpu_isa).
//
// Contracts (those of the torch backend's sgflow::attention_dual_{fwd,bwd}_torch, sgflow/ops/attention.py):
//   q, q_dot [B, H, Nq, D], k, k_dot [B, H, Nk, D], v, v_dot [B, H, Nk, Dv]: f32 or f64, one dtype, any strides
//   (a last dim of stride other than 1 is made contiguous here; heads split off the channels are read in place).
//   attention_dual_fwd_cpu -> o, o_dot [B, H, Nq, Dv] (contiguous), lse, mu [B, H, Nq] (x's dtype)
//   attention_dual_bwd_cpu -> dq, dk, dv, dq_dot, dk_dot, dv_dot (contiguous); the last three are empty
//                             tensors when g_o_dot is None; all zeros when both cotangents are None.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_dual_cpu.h"

namespace sgflow {
namespace {

using cpu::AttnArgs;

const char* const kNames[10] = {"q", "k", "v", "q_dot", "k_dot", "v_dot", "o", "o_dot", "g_o", "g_o_dot"};

// A unit last stride (the kernels read rows as contiguous vectors); other strides are passed through.
// (Other ranks pass through to check_inputs, which names them.)
at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.dim() != 4 || t.stride(3) == 1 || t.size(3) == 1 ? t : t.contiguous();
}

void check_inputs(const at::Tensor* t, int n) {
  const at::Tensor& q = t[0];
  TORCH_CHECK(q.device().is_cpu(), "sgflow::attention_dual_cpu: CPU tensors only, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "sgflow::attention_dual_cpu: float32 or float64 only, got ", q.scalar_type());
  for (int i = 0; i < n; ++i) {
    if (!t[i].defined()) continue;
    TORCH_CHECK(t[i].dim() == 4, "sgflow::attention_dual_cpu: ", kNames[i], " must be 4-D [B, H, N, D], got ",
                t[i].sizes());
    TORCH_CHECK(t[i].scalar_type() == q.scalar_type() && t[i].device() == q.device(),
                "sgflow::attention_dual_cpu: ", kNames[i], " is ", t[i].scalar_type(), " on ", t[i].device(),
                ", q is ", q.scalar_type(), " on ", q.device());
  }
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Nk = t[1].size(2), Dv = t[2].size(3);
  const std::vector<int64_t> want[10] = {{B, H, Nq, D}, {B, H, Nk, D}, {B, H, Nk, Dv}, {B, H, Nq, D},
                                         {B, H, Nk, D}, {B, H, Nk, Dv}, {B, H, Nq, Dv}, {B, H, Nq, Dv},
                                         {B, H, Nq, Dv}, {B, H, Nq, Dv}};
  for (int i = 0; i < n; ++i)
    TORCH_CHECK(!t[i].defined() || t[i].sizes() == at::IntArrayRef(want[i]), "sgflow::attention_dual_cpu: ",
                kNames[i], " has shape ", t[i].sizes(), ", expected ", at::IntArrayRef(want[i]));
  TORCH_CHECK(Nq > 0 && Nk > 0 && D > 0 && Dv > 0, "sgflow::attention_dual_cpu: empty sequence or head dim");
}

AttnArgs args_of(const at::Tensor* t, int n, double scale) {
  AttnArgs a{};
  a.f64 = t[0].scalar_type() == at::kDouble;
  a.B = t[0].size(0), a.H = t[0].size(1), a.Nq = t[0].size(2), a.D = t[0].size(3);
  a.Nk = t[1].size(2), a.Dv = t[2].size(3);
  a.scale = scale;
  for (int i = 0; i < n; ++i) {
    if (!t[i].defined()) continue;
    a.in[i] = t[i].const_data_ptr();
    for (int d = 0; d < 3; ++d) a.stride[i][d] = t[i].stride(d);
  }
  return a;
}

void run_fwd(const AttnArgs& a, int64_t begin, int64_t end, void* scratch) {
  switch (cpu::active_isa_index()) {
#ifdef SGFLOW_CPU_X86_DISPATCH
    case 2: return cpu::avx512::attention_dual_fwd(a, begin, end, scratch);
    case 1: return cpu::avx2::attention_dual_fwd(a, begin, end, scratch);
#endif
    default: return cpu::base::attention_dual_fwd(a, begin, end, scratch);
  }
}

void run_bwd(const AttnArgs& a, int64_t begin, int64_t end, void* scratch) {
  switch (cpu::active_isa_index()) {
#ifdef SGFLOW_CPU_X86_DISPATCH
    case 2: return cpu::avx512::attention_dual_bwd(a, begin, end, scratch);
    case 1: return cpu::avx2::attention_dual_bwd(a, begin, end, scratch);
#endif
    default: return cpu::base::attention_dual_bwd(a, begin, end, scratch);
  }
}

// The BLAS path for wide heads: the products then dominate, and the BLAS runs them faster than the vector
// kernels written for heads of 8 (benchmarks/NOTES.md, issue 18 part 13). Every row stride must be a valid
// BLAS leading dimension and every size an int.
bool use_blas(const AttnArgs& a, int n) {
  if (std::max(a.D, a.Dv) < kAttnBlasMinWidth || !attention_blas_enabled()) return false;
  const int64_t width[10] = {a.D, a.D, a.Dv, a.D, a.D, a.Dv, a.Dv, a.Dv, a.Dv, a.Dv};
  for (int i = 0; i < n; ++i)
    if (a.in[i] != nullptr && a.stride[i][2] < width[i]) return false;
  const int64_t big = std::max({a.Nq, a.Nk, a.D, a.Dv}) * std::max({a.Nk, a.D, a.Dv});
  return big < (int64_t{1} << 31);
}

// Heads over threads, one scratch per task (each head's keys, values and key-side gradients: O(Nk (D + Dv))).
template <typename Run>
void over_heads(const AttnArgs& a, int64_t scratch_elems, Run run) {
  const size_t bytes = static_cast<size_t>(scratch_elems) * (a.f64 ? sizeof(double) : sizeof(float));
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch((bytes + sizeof(double) - 1) / sizeof(double));
    run(a, begin, end, scratch.data());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& q_dot,
                                                               const at::Tensor& k_dot, const at::Tensor& v_dot,
                                                               double scale) {
  const at::Tensor t[6] = {rows_contiguous(q),     rows_contiguous(k),     rows_contiguous(v),
                           rows_contiguous(q_dot), rows_contiguous(k_dot), rows_contiguous(v_dot)};
  check_inputs(t, 6);
  AttnArgs a = args_of(t, 6, scale);
  const auto opts = q.options();
  at::Tensor o = at::empty({a.B, a.H, a.Nq, a.Dv}, opts), od = at::empty({a.B, a.H, a.Nq, a.Dv}, opts);
  at::Tensor lse = at::empty({a.B, a.H, a.Nq}, opts), mu = at::empty({a.B, a.H, a.Nq}, opts);
  a.out[0] = o.data_ptr(), a.out[1] = od.data_ptr(), a.lse = lse.data_ptr(), a.mu = mu.data_ptr();
  if (use_blas(a, 6))
    attention_dual_fwd_blas(a);
  else
    over_heads(a, cpu::attn_fwd_scratch(a), run_fwd);
  return {o, od, lse, mu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_dot, const at::Tensor& k_dot,
    const at::Tensor& v_dot, const at::Tensor& o, const at::Tensor& o_dot, const at::Tensor& lse,
    const at::Tensor& mu, const std::optional<at::Tensor>& g_o, const std::optional<at::Tensor>& g_o_dot,
    double scale) {
  const at::Tensor t[10] = {rows_contiguous(q),     rows_contiguous(k),     rows_contiguous(v),
                            rows_contiguous(q_dot), rows_contiguous(k_dot), rows_contiguous(v_dot),
                            rows_contiguous(o),     rows_contiguous(o_dot),
                            g_o ? rows_contiguous(*g_o) : at::Tensor(),
                            g_o_dot ? rows_contiguous(*g_o_dot) : at::Tensor()};
  check_inputs(t, 10);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2);
  for (const at::Tensor* s : {&lse, &mu})
    TORCH_CHECK(s->sizes() == at::IntArrayRef({B, H, Nq}) && s->scalar_type() == q.scalar_type(),
                "sgflow::attention_dual_bwd_cpu: lse and mu must be [B, H, Nq] of q's dtype, got ", s->sizes(), " ",
                s->scalar_type());
  const auto opts = q.options();
  // Distinct empty tensors: outputs of a functional op must not alias each other.
  const auto empty = [&] { return at::empty({0}, opts); };
  if (!g_o && !g_o_dot)
    return {at::zeros_like(q, at::MemoryFormat::Contiguous), at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous), empty(), empty(), empty()};
  const at::Tensor lse_c = lse.contiguous(), mu_c = mu.contiguous();
  AttnArgs a = args_of(t, 10, scale);
  a.lse = const_cast<void*>(lse_c.const_data_ptr());
  a.mu = const_cast<void*>(mu_c.const_data_ptr());
  at::Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(k.sizes(), opts), dv = at::empty(v.sizes(), opts);
  at::Tensor dqd = empty(), dkd = empty(), dvd = empty();
  if (g_o_dot) dqd = at::empty(q.sizes(), opts), dkd = at::empty(k.sizes(), opts), dvd = at::empty(v.sizes(), opts);
  at::Tensor outs[6] = {dq, dk, dv, dqd, dkd, dvd};
  for (int i = 0; i < 6; ++i) a.out[i] = outs[i].numel() ? outs[i].data_ptr() : nullptr;
  if (use_blas(a, 10))
    attention_dual_bwd_blas(a);
  else
    over_heads(a, cpu::attn_bwd_scratch(a), run_bwd);
  return {dq, dk, dv, dqd, dkd, dvd};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgflow, CPU, m) {
  m.impl("attention_dual_fwd_cpu", &fwd);
  m.impl("attention_dual_bwd_cpu", &bwd);
}

}  // namespace sgflow
