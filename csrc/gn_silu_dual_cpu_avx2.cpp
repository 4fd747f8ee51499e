// AVX2 + FMA copy of the CPU kernels; gn_silu_dual_cpu.cpp calls it on CPUs that report both.
// Standard headers come before the target switch so that only sgflow's own functions get AVX2 code.
#include <cmath>
#include <cstdint>

#include "gn_silu_dual_cpu.h"
#include "pointwise_dual_cpu.h"
#include "attention_dual_cpu.h"

#ifdef SGFLOW_CPU_X86_DISPATCH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define SGFLOW_ISA avx2
#include "gn_silu_dual_cpu_kernels.h"
#include "pointwise_dual_cpu_kernels.h"
#include "attention_dual_cpu_kernels.h"
#undef SGFLOW_ISA

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // SGFLOW_CPU_X86_DISPATCH
