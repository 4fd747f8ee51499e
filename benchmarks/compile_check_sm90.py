"""Compile the GroupNorm+SiLU dual backward kernel for sm_90 without a GPU (Triton's offline compiler and
its bundled ptxas), for every dtype and flag combination: catches kernels that the CPU interpreter accepts
but the GPU compiler rejects.

    python benchmarks/compile_check_sm90.py
"""
import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not interpret
sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "python"), os.path.join(os.path.dirname(__file__), "..")]

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import sgflow_kernels.groupnorm_silu as K  # noqa: E402

POINTER = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}


def signature(fn, dtype, consts):
    acc = "*fp64" if dtype == "fp64" else "*fp32"
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("STATS_ptr", "DW_ptr", "DB_ptr", "W_ptr", "BIAS_ptr"):
            sig[name] = acc
        elif name == "MASK_ptr":
            sig[name] = "*u8"
        elif name.endswith("_ptr"):
            sig[name] = POINTER[dtype]
        elif name.startswith("SCALE"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def main():
    target = GPUTarget("cuda", 90, 32)
    fn = K._groupnorm_silu_dual_bwd_kernel
    count = 0
    for dtype, one_tile, has_mask, has_gy, has_gyd in itertools.product(
        ["bf16", "fp16", "fp32", "fp64"], [True, False], [True, False], [True, False], [True, False]
    ):
        if not (has_gy or has_gyd):
            continue
        consts = dict(BLOCK_C=8, BLOCK_S=256, ONE_TILE=one_tile, HAS_MASK=has_mask, HAS_GY=has_gy, HAS_GYD=has_gyd)
        triton.compile(ASTSource(fn, signature(fn, dtype, consts), constexprs=consts), target=target,
                       options={"num_warps": 4})
        count += 1
    print(f"compiled {count} variants of {fn.__name__} for sm_90")


if __name__ == "__main__":
    main()
