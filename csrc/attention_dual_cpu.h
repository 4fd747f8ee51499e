// CPU kernels of the dual (primal + tangent) softmax attention: argument block, scratch sizes, entry points.
//
// Plain C++ on raw pointers, no torch headers: attention_dual_cpu_kernels.h is compiled into each
// instruction-set translation unit (gn_silu_dual_cpu{,_avx2,_avx512}.cpp) and attention_dual_cpu.cpp, the
// torch binding, picks one at run time, as for the GroupNorm -> SiLU kernels. Math: the module docstring of
// python/sgflow/ops/attention.py; loop structure: attention_dual_cpu_kernels.h.
#pragma once

#include <cstdint>

namespace sgflow::cpu {

// Key columns per register block; a head's keys are padded to a multiple of it in the scratch.
constexpr int64_t kAttnBlock = 16;

// Query rows per tile: the key-side gradient rows and the transposed keys are read once per tile.
constexpr int64_t kAttnRows = 4;

inline int64_t attn_padded(int64_t n) { return (n + kAttnBlock - 1) / kAttnBlock * kAttnBlock; }

// One call over B*H heads. Tensors are f32 (f64 where f64), [B, H, N, D] with a unit last stride; `stride`
// holds the element strides of their B, H and N dims.
//   in:  0 q [Nq, D], 1 k [Nk, D], 2 v [Nk, Dv], 3 q_dot, 4 k_dot, 5 v_dot,
//        backward only: 6 o [Nq, Dv], 7 o_dot, 8 g (may be null), 9 g_dot (may be null; not both)
//   lse, mu: [B, H, Nq] contiguous (forward writes them, backward reads them)
//   out: forward 0 o, 1 o_dot [B, H, Nq, Dv]; backward 0 dq, 1 dk, 2 dv, 3 dq_dot, 4 dk_dot, 5 dv_dot
//        (3-5 only with g_dot); all contiguous.
struct AttnArgs {
  bool f64;
  int64_t B, H, Nq, Nk, D, Dv;
  double scale;
  const void* in[10];
  int64_t stride[10][3];
  void* lse;
  void* mu;
  void* out[6];
};

// Scratch elements (of the accumulation type) one thread needs for one head.
inline int64_t attn_fwd_scratch(const AttnArgs& a) {
  const int64_t np = attn_padded(a.Nk);
  // k^T, k_dot^T, v^T, v_dot^T; two score rows and s q, s q_dot per row of a tile
  return np * (2 * a.D + 2 * a.Dv + 2 * kAttnRows) + 2 * kAttnRows * a.D;
}

inline int64_t attn_bwd_scratch(const AttnArgs& a) {
  const int64_t np = attn_padded(a.Nk);
  // the transposed inputs and their gradients; four score rows and s q, s q_dot per row of a tile
  return np * (4 * a.D + 4 * a.Dv + 4 * kAttnRows) + 2 * kAttnRows * a.D;
}

#define SGFLOW_DECLARE_ATTN_KERNELS(isa)                                                  \
  namespace isa {                                                                         \
  void attention_dual_fwd(const AttnArgs& args, int64_t bh_begin, int64_t bh_end, void* scratch); \
  void attention_dual_bwd(const AttnArgs& args, int64_t bh_begin, int64_t bh_end, void* scratch); \
  }

SGFLOW_DECLARE_ATTN_KERNELS(base)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#ifndef SGFLOW_CPU_X86_DISPATCH
#define SGFLOW_CPU_X86_DISPATCH 1  // as gn_silu_dual_cpu.h defines it
#endif
SGFLOW_DECLARE_ATTN_KERNELS(avx2)
SGFLOW_DECLARE_ATTN_KERNELS(avx512)
#endif

#undef SGFLOW_DECLARE_ATTN_KERNELS

int active_isa_index();

}  // namespace sgflow::cpu

namespace sgflow {

// Wide heads (attention_dual_cpu_blas.cpp): query-row tiles whose products run on the BLAS torch links
// (sgemm_ / dgemm_, looked up at run time), threaded over heads. Contracts as the kernels above; row strides
// (stride[i][2]) of at least the row length.
bool attention_blas_available();
bool attention_blas_enabled();  // available and not switched off (sgflow::_attention_blas)
void attention_dual_fwd_blas(const cpu::AttnArgs& args);
void attention_dual_bwd_blas(const cpu::AttnArgs& args);

// Heads wider than this run on the BLAS path where it is available (attention_dual_cpu.cpp).
constexpr int64_t kAttnBlasMinWidth = 9;

}  // namespace sgflow
