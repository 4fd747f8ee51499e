// AVX-512 (F, VL, BW, DQ) copy of the CPU kernels; gn_silu_dual_cpu.cpp calls it on CPUs that report all four.
// Standard headers come before the target switch so that only sgflow's own functions get AVX-512 code.
#include <cmath>
#include <cstdint>

#include "gn_silu_dual_cpu.h"
#include "pointwise_dual_cpu.h"
#include "attention_dual_cpu.h"

#ifdef SGFLOW_CPU_X86_DISPATCH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")
#endif

#define SGFLOW_ISA avx512
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
