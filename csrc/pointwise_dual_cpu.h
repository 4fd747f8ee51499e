// CPU kernels of the dual elementwise ops (tanh-GELU, SiLU): argument blocks and entry points.
//
// Plain C++ on raw pointers, no torch headers: pointwise_dual_cpu_kernels.h is compiled into each
// instruction-set translation unit (gn_silu_dual_cpu{,_avx2,_avx512}.cpp) and pointwise_dual_cpu.cpp,
// the torch binding, picks one at run time, as for the GroupNorm -> SiLU kernels. Math: see
// pointwise_dual_cpu_kernels.h.
#pragma once

#include <cstdint>

namespace sgflow::cpu {

enum class PwKind : int { gelu_tanh = 0, silu = 1 };

// Contiguous f32 (f64 where f64) spans of n elements.
struct PwFwdArgs {
  PwKind kind;
  bool f64;
  const void* x;
  const void* x_dot;
  void* y;
  void* y_dot;
};

// g or g_dot may be null (not both); dx_dot is written where g_dot is given.
struct PwBwdArgs {
  PwKind kind;
  bool f64;
  const void* x;
  const void* x_dot;
  const void* g;
  const void* g_dot;
  void* dx;
  void* dx_dot;
};

#define SGFLOW_DECLARE_PW_KERNELS(isa)                                        \
  namespace isa {                                                             \
  void pointwise_dual_fwd(const PwFwdArgs& args, int64_t begin, int64_t end); \
  void pointwise_dual_bwd(const PwBwdArgs& args, int64_t begin, int64_t end); \
  }

SGFLOW_DECLARE_PW_KERNELS(base)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#ifndef SGFLOW_CPU_X86_DISPATCH
#define SGFLOW_CPU_X86_DISPATCH 1  // as gn_silu_dual_cpu.h defines it
#endif
SGFLOW_DECLARE_PW_KERNELS(avx2)
SGFLOW_DECLARE_PW_KERNELS(avx512)
#endif

#undef SGFLOW_DECLARE_PW_KERNELS

// The instruction set the CPU kernels use now (0 base, 1 AVX2, 2 AVX-512; gn_silu_dual_cpu.cpp).
int active_isa_index();

}  // namespace sgflow::cpu
