// CUDA kernels of the dual (primal + tangent) GroupNorm -> SiLU op: launchers.
//
// CUDA headers only (raw pointers, sizes, a stream): the .cu compiles with nvcc alone, without torch's
// CUDA headers (which a CPU build of torch does not ship complete). The torch binding that calls these
// is gn_silu_dual_cuda_binding.cpp. Math: gn_silu_dual_cpu_kernels.h (the same formulas).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "gn_silu_dual_args.h"

namespace sgflow::cuda {

// Largest group (C/G * S elements) the kernels index (32-bit offsets inside a group).
constexpr int64_t kMaxGroupElems = (int64_t{1} << 31) - 1;

// Forward: y, y_dot and the [4, B, G] statistics. One block per (sample, group). Asynchronous on
// `stream`; returns the launch error (cudaSuccess when launched).
cudaError_t gn_silu_dual_fwd(GnDtype dtype, const GnFwdArgs& args, cudaStream_t stream);

// Backward: g_x (and g_x_dot when g_y_dot is given) and the [B, C] per-sample parameter-gradient
// partials. Needs g_y or g_y_dot.
cudaError_t gn_silu_dual_bwd(GnDtype dtype, const GnBwdArgs& args, cudaStream_t stream);

}  // namespace sgflow::cuda
