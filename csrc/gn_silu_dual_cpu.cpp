// CPU implementation of sgflow::gn_silu_dual_{fwd,fwd_out,bwd,bwd_out}: the baseline instantiation of
// the kernels (gn_silu_dual_cpu_kernels.h), the run-time choice between it and the AVX2 / AVX-512
// copies, threading over (sample, group) and the torch binding.
//
// Threads: at::parallel_for over the B*G (sample, group) pairs, ATen's intra-op pool (OpenMP in the
// standard wheels, sized by torch.set_num_threads). Each pair is independent and written by one
// thread, and the per-channel parameter gradients are per-sample partials summed over the batch in a
// fixed order afterwards, so results do not depend on the number of threads.

#include "gn_silu_dual_cpu.h"
#include "pointwise_dual_cpu.h"
#include "attention_dual_cpu.h"

#define SGFLOW_ISA base
#include "gn_silu_dual_cpu_kernels.h"
#include "pointwise_dual_cpu_kernels.h"  // the dual GELU / SiLU kernels share its exp and sigmoid
#include "attention_dual_cpu_kernels.h"  // and the dual attention's
#undef SGFLOW_ISA

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>
#include <tuple>

#include "gn_silu_dual_common.h"

namespace sgflow {
namespace {

// ---------------------------------------------------------------------------------------------------
// instruction set
// ---------------------------------------------------------------------------------------------------
enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"base", "avx2", "avx512"};

bool isa_supported(int isa) {
#ifdef SGFLOW_CPU_X86_DISPATCH
  __builtin_cpu_init();
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
  return isa == kBase;
}

int isa_from_name(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return i;
  TORCH_CHECK(false, "sgflow: unknown CPU instruction set '", name, "' (expected base, avx2 or avx512)");
}

// Default: the widest supported copy. Measured on AMD EPYC Zen 4 (1 thread, cifar10 32x32 group,
// batch 8, fp32, csrc-level timing): forward 1.6 ms AVX-512 / 2.1 ms AVX2 / 5.5 ms baseline, backward
// 3.8 / 4.5 / 8.7 ms. SGFLOW_CPU_ISA=base|avx2|avx512 (or torch.ops.sgflow._cpu_isa) overrides it, e.g.
// on CPUs whose clock drops under 512-bit code.
int default_isa() {
  if (const char* env = std::getenv("SGFLOW_CPU_ISA"); env && *env) {
    const int isa = isa_from_name(env);
    TORCH_CHECK(isa_supported(isa), "sgflow: SGFLOW_CPU_ISA=", env, " is not supported by this CPU");
    return isa;
  }
  if (isa_supported(kAvx512)) return kAvx512;
  return isa_supported(kAvx2) ? kAvx2 : kBase;
}

std::atomic<int>& active_isa() {
  static std::atomic<int> isa{default_isa()};
  return isa;
}

void run_fwd_groups(GnDtype dt, const GnFwdArgs& a, int64_t begin, int64_t end) {
  switch (active_isa().load(std::memory_order_relaxed)) {
#ifdef SGFLOW_CPU_X86_DISPATCH
    case kAvx512: return cpu::avx512::fwd_groups(dt, a, begin, end);
    case kAvx2: return cpu::avx2::fwd_groups(dt, a, begin, end);
#endif
    default: return cpu::base::fwd_groups(dt, a, begin, end);
  }
}

void run_bwd_groups(GnDtype dt, const GnBwdArgs& a, int64_t begin, int64_t end, void* scratch) {
  switch (active_isa().load(std::memory_order_relaxed)) {
#ifdef SGFLOW_CPU_X86_DISPATCH
    case kAvx512: return cpu::avx512::bwd_groups(dt, a, begin, end, scratch);
    case kAvx2: return cpu::avx2::bwd_groups(dt, a, begin, end, scratch);
#endif
    default: return cpu::base::bwd_groups(dt, a, begin, end, scratch);
  }
}

// ---------------------------------------------------------------------------------------------------
// the CPU device of GnOps (gn_silu_dual_common.h): threading over (sample, group)
// ---------------------------------------------------------------------------------------------------
// Groups per parallel task: at least ~32K elements each, so that small problems are not split over
// threads whose wake-up costs more than the work.
int64_t grain(const GnShape& sh) {
  const int64_t n = std::max<int64_t>(1, (sh.C / sh.G) * sh.S);
  return std::max<int64_t>(1, (int64_t{1} << 15) / n);
}

struct CpuDevice {
  // fp16 has no kernel of its own (CPU fp16 is rare: autocast on CPU uses bf16): it runs the fp32
  // kernels on widened copies, with the same fp32 arithmetic as the other backends.
  static constexpr bool widen_half = true;

  static void fwd(const GnShape& sh, const at::Tensor& x, const at::Tensor& xd, const at::Tensor& w,
                  const at::Tensor& b, const at::Tensor& mask, double drop_scale, double eps, const at::Tensor& y,
                  const at::Tensor& yd, const at::Tensor& stats) {
    const GnFwdArgs a = fwd_args(sh, x, xd, w, b, mask, drop_scale, eps, y, yd, stats);
    const GnDtype dt = gn_dtype(x.scalar_type());
    at::parallel_for(0, sh.B * sh.G, grain(sh),
                     [&](int64_t begin, int64_t end) { run_fwd_groups(dt, a, begin, end); });
  }

  static std::tuple<at::Tensor, at::Tensor> bwd(const GnShape& sh, const at::Tensor& x, const at::Tensor& xd,
                                                const at::Tensor& w, const at::Tensor& b, const at::Tensor& stats,
                                                const at::Tensor& g_y, const at::Tensor& g_yd, const at::Tensor& mask,
                                                double drop_scale, const at::Tensor& g_x, const at::Tensor& g_xd) {
    const auto acc = acc_dtype(x.scalar_type());
    const auto acc_opts = x.options().dtype(acc);
    at::Tensor part_w = at::empty({sh.B, sh.C}, acc_opts);
    at::Tensor part_b = at::empty({sh.B, sh.C}, acc_opts);
    const GnBwdArgs a = bwd_args(sh, x, xd, w, b, stats, g_y, g_yd, mask, drop_scale, g_x, g_xd, part_w, part_b);
    const GnDtype dt = gn_dtype(x.scalar_type());
    const int64_t scratch_bytes = cpu::bwd_scratch_elems(a) * static_cast<int64_t>(at::elementSize(acc));
    at::parallel_for(0, sh.B * sh.G, grain(sh), [&](int64_t begin, int64_t end) {
      // One scratch per task, reused by its groups (double[] for 8-byte alignment of either type).
      std::unique_ptr<double[]> scratch(new double[std::max<int64_t>(1, (scratch_bytes + 7) / 8)]);
      run_bwd_groups(dt, a, begin, end, scratch.get());
    });
    // Sum the per-sample partials over the batch, in order and in fp64.
    at::Tensor g_w = at::empty({sh.C}, acc_opts), g_b = at::empty({sh.C}, acc_opts);
    if (acc == at::kDouble) {
      batch_sum(part_w.const_data_ptr<double>(), g_w.data_ptr<double>(), sh.B, sh.C);
      batch_sum(part_b.const_data_ptr<double>(), g_b.data_ptr<double>(), sh.B, sh.C);
    } else {
      batch_sum(part_w.const_data_ptr<float>(), g_w.data_ptr<float>(), sh.B, sh.C);
      batch_sum(part_b.const_data_ptr<float>(), g_b.data_ptr<float>(), sh.B, sh.C);
    }
    return {g_w, g_b};
  }

  template <typename A>
  static void batch_sum(const A* part, A* out, int64_t B, int64_t C) {
    for (int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (int64_t i = 0; i < B; ++i) s += part[i * C + c];
      out[c] = static_cast<A>(s);
    }
  }
};

using CpuOps = GnOps<CpuDevice>;

}  // namespace

namespace cpu {
int active_isa_index() { return active_isa().load(std::memory_order_relaxed); }
}  // namespace cpu

// sgflow::_cpu_isa: the instruction set the CPU kernels use now; with an argument, switch to it first
// (tests run both copies; SGFLOW_CPU_ISA sets the start value).
std::string cpu_isa(const std::optional<std::string>& isa) {
  if (isa.has_value()) {
    const int i = isa_from_name(*isa);
    TORCH_CHECK(isa_supported(i), "sgflow: CPU instruction set '", *isa, "' is not supported by this CPU");
    active_isa().store(i);
  }
  return kIsaNames[active_isa().load()];
}

TORCH_LIBRARY_IMPL(sgflow, CPU, m) {
  m.impl("gn_silu_dual_fwd", &CpuOps::fwd);
  m.impl("gn_silu_dual_fwd_out", &CpuOps::fwd_out);
  m.impl("gn_silu_dual_bwd", &CpuOps::bwd);
  m.impl("gn_silu_dual_bwd_out", &CpuOps::bwd_out);
}

}  // namespace sgflow
