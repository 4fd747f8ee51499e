// CUDA implementation of sgflow::gn_silu_dual_{fwd,fwd_out,bwd,bwd_out}: the torch side of the kernels
// in gn_silu_dual_cuda.cu. Compiled (by the host compiler, with torch's CUDA headers) only when torch is
// a CUDA build; the .cu itself includes CUDA headers only.
//
// Kernels run on the current stream of x's device (under a device guard), asynchronously. The
// per-sample parameter-gradient partials [B, C] are summed over the batch with torch (one small
// reduction kernel, deterministic).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

#include "gn_silu_dual_common.h"
#include "gn_silu_dual_cuda.h"

namespace sgflow {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "sgflow: launching the CUDA ", what, " kernel failed: ", cudaGetErrorString(err));
}

void check_group_size(const GnShape& sh) {
  TORCH_CHECK((sh.C / sh.G) * sh.S <= cuda::kMaxGroupElems, "sgflow: a GroupNorm group of ", (sh.C / sh.G) * sh.S,
              " elements is too large for the CUDA kernels (at most ", cuda::kMaxGroupElems, ")");
}

struct CudaDevice {
  static constexpr bool widen_half = false;  // the CUDA kernels read and write fp16 themselves

  static void fwd(const GnShape& sh, const at::Tensor& x, const at::Tensor& xd, const at::Tensor& w,
                  const at::Tensor& b, const at::Tensor& mask, double drop_scale, double eps, const at::Tensor& y,
                  const at::Tensor& yd, const at::Tensor& stats) {
    check_group_size(sh);
    const c10::cuda::CUDAGuard guard(x.device());
    const GnFwdArgs a = fwd_args(sh, x, xd, w, b, mask, drop_scale, eps, y, yd, stats);
    check_launch(cuda::gn_silu_dual_fwd(gn_dtype(x.scalar_type()), a, c10::cuda::getCurrentCUDAStream().stream()),
                 "GroupNorm-SiLU forward");
  }

  static std::tuple<at::Tensor, at::Tensor> bwd(const GnShape& sh, const at::Tensor& x, const at::Tensor& xd,
                                                const at::Tensor& w, const at::Tensor& b, const at::Tensor& stats,
                                                const at::Tensor& g_y, const at::Tensor& g_yd, const at::Tensor& mask,
                                                double drop_scale, const at::Tensor& g_x, const at::Tensor& g_xd) {
    check_group_size(sh);
    const c10::cuda::CUDAGuard guard(x.device());
    const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
    at::Tensor part_w = at::empty({sh.B, sh.C}, acc_opts);
    at::Tensor part_b = at::empty({sh.B, sh.C}, acc_opts);
    const GnBwdArgs a = bwd_args(sh, x, xd, w, b, stats, g_y, g_yd, mask, drop_scale, g_x, g_xd, part_w, part_b);
    check_launch(cuda::gn_silu_dual_bwd(gn_dtype(x.scalar_type()), a, c10::cuda::getCurrentCUDAStream().stream()),
                 "GroupNorm-SiLU backward");
    return {part_w.sum(0), part_b.sum(0)};
  }
};

using CudaOps = GnOps<CudaDevice>;

}  // namespace

TORCH_LIBRARY_IMPL(sgflow, CUDA, m) {
  m.impl("gn_silu_dual_fwd", &CudaOps::fwd);
  m.impl("gn_silu_dual_fwd_out", &CudaOps::fwd_out);
  m.impl("gn_silu_dual_bwd", &CudaOps::bwd);
  m.impl("gn_silu_dual_bwd_out", &CudaOps::bwd_out);
}

}  // namespace sgflow
