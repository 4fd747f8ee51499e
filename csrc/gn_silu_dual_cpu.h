// CPU kernels of the dual (primal + tangent) GroupNorm -> SiLU op: argument blocks and entry points.
//
// Plain C++ on raw pointers (argument blocks: gn_silu_dual_args.h), no torch headers:
// gn_silu_dual_cpu_kernels.h is compiled once per instruction set (baseline and, on x86-64, AVX2+FMA /
// AVX-512) and gn_silu_dual_cpu.cpp, the torch binding, picks one at run time. Math: see
// gn_silu_dual_cpu_kernels.h.
#pragma once

#include <cstdint>

#include "gn_silu_dual_args.h"

namespace sgflow::cpu {

// The kernels take f32, f64 and bf16; fp16 inputs are widened to f32 by the binding before they get here.
using Dtype = GnDtype;
using FwdArgs = GnFwdArgs;
using BwdArgs = GnBwdArgs;

// Scratch a backward call needs per thread, in elements of the accumulation type.
inline int64_t bwd_scratch_elems(const BwdArgs& a) { return 2 * (a.C / a.G) * a.S; }

#define SGFLOW_DECLARE_CPU_KERNELS(isa)                                                  \
  namespace isa {                                                                        \
  void fwd_groups(Dtype dtype, const FwdArgs& args, int64_t begin, int64_t end);         \
  void bwd_groups(Dtype dtype, const BwdArgs& args, int64_t begin, int64_t end,          \
                  void* scratch);                                                        \
  }

SGFLOW_DECLARE_CPU_KERNELS(base)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SGFLOW_CPU_X86_DISPATCH 1
SGFLOW_DECLARE_CPU_KERNELS(avx2)
SGFLOW_DECLARE_CPU_KERNELS(avx512)
#endif

#undef SGFLOW_DECLARE_CPU_KERNELS

}  // namespace sgflow::cpu
