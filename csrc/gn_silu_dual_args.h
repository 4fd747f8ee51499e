// Argument blocks of the dual GroupNorm -> SiLU kernels, shared by the CPU (gn_silu_dual_cpu*.cpp) and
// CUDA (gn_silu_dual_cuda.cu) kernels. Plain C++ with raw pointers: no torch header, so that the .cu
// compiles with nvcc alone.
//
// Layout: x, x_dot and the [B, C, *spatial] outputs are contiguous [B, C, S] (S = product of the
// spatial sizes), so group g of sample b is one contiguous run of CG*S elements (CG = C/G) starting at
// (b*C + g*CG)*S = (b*G + g)*CG*S. "acc" is the accumulation type: double for f64 inputs, float
// otherwise.
#pragma once

#include <cstdint>

namespace sgflow {

// Element type of x, x_dot, the outputs and the cotangents (f16 / bf16 are carried as raw 16 bits).
enum class GnDtype : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

struct GnFwdArgs {
  const void* x;        // [B, C, S] dtype
  const void* x_dot;    // [B, C, S] dtype
  const void* weight;   // [C] acc, or nullptr (gamma = 1)
  const void* bias;     // [C] acc, or nullptr (beta = 0)
  const uint8_t* mask;  // [B, C, S] dropout keep-mask (0/1 bytes of a bool tensor), or nullptr
  double drop_scale;    // factor of kept values, 1/(1-p)
  void* y;              // [B, C, S] dtype
  void* y_dot;          // [B, C, S] dtype
  void* stats;          // [4, B, G] acc: mean, rstd, mean_dot, rstd_dot
  int64_t B, C, S, G;
  double eps;
};

struct GnBwdArgs {
  const void* x;
  const void* x_dot;
  const void* weight;
  const void* bias;
  const uint8_t* mask;
  double drop_scale;
  const void* stats;        // [4, B, G] as written by the forward
  const void* g_y;          // [B, C, S] dtype, or nullptr (zero)
  const void* g_y_dot;      // [B, C, S] dtype, or nullptr (zero); not both nullptr
  void* g_x;                // [B, C, S] dtype; may be the very buffer of g_y (each element of g_y is
                            // read before the element of g_x at the same place is written)
  void* g_x_dot;            // [B, C, S] dtype, nullptr iff g_y_dot is; may be the buffer of g_y_dot
  void* g_weight_part;      // [B, C] acc: per-sample partial sums of g_gamma
  void* g_bias_part;        // [B, C] acc: per-sample partial sums of g_beta
  int64_t B, C, S, G;
};

}  // namespace sgflow
