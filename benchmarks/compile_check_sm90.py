"""Compile the backward kernels for sm_90 without a GPU (Triton's offline compiler and its bundled ptxas):
the GroupNorm+SiLU dual kernels for every dtype and flag combination, and the dual-attention forward, dK/dV
and dQ kernels at their default tile configs on every precision path the launchers can take (fp32 with
tf32x3 / ieee / tf32 dots, fp16, bf16, fp64), with register/spill counts from ptxas. Catches kernels that the CPU
interpreter accepts but the GPU compiler rejects.

    python benchmarks/compile_check_sm90.py            # all variants, with ptxas register/spill counts
    python benchmarks/compile_check_sm90.py --quick    # a subset (the test suite runs this)
"""
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not interpret
sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "python"), os.path.join(os.path.dirname(__file__), "..")]

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

import sgflow_kernels.attention as A  # noqa: E402
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
        elif name.startswith(("SCALE", "EPS")):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def ptxas_report(ptx: str) -> str:
    """'Used N registers, M bytes spill stores' from the bundled ptxas for one PTX module."""
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself compiles with

    ptxas = get_ptxas(90).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    return ", ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores", out.stderr)) or out.stderr.strip()[:200]


def attention_signature(fn, dtype, consts):
    acc = "*fp64" if dtype == "fp64" else "*fp32"
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("Lse_ptr", "Mu_ptr", "Alpha_ptr", "Delta_ptr", "Scale_ptr"):
            sig[name] = acc
        elif name.endswith("_ptr"):
            sig[name] = POINTER[dtype]
        else:
            sig[name] = "i32"
    return sig


# Every precision path the attention launchers can take: (pointer dtype, DOT_PRECISION); fp32 uses
# $SGFLOW_ATTENTION_FP32_PRECISION (default tf32x3, or ieee / tf32); the other dtypes ignore it.
PRECISIONS = [("fp32", "tf32x3"), ("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "tf32"), ("bf16", "tf32"),
              ("fp64", "tf32")]
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def _acc(dtype):
    return triton.language.float64 if dtype == "fp64" else triton.language.float32


def check_attention(target, quick):
    """dK/dV and dQ kernels: every precision path at D=64 with both cotangents (quick); also D=128 and the
    single-cotangent variants (full)."""
    dims = [64] if quick else [64, 128]
    flags = [(True, True)] if quick else [(True, True), (True, False), (False, True)]
    for (dtype, prec), d, kind in itertools.product(PRECISIONS, dims, ["bwd_dkv", "bwd_dq"]):
        # the tiled kernels are triton.autotune objects: compile their JITFunction at the default config
        fn = (A._attention_dual_bwd_dkv_kernel if kind == "bwd_dkv" else A._attention_dual_bwd_dq_kernel).fn
        bm, bn, warps, stages = A._candidates(kind, d, d, TORCH_DTYPE[dtype])[0]
        for has_g, has_gd in flags:
            consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, BLOCK_DV=d, HAS_G=has_g, HAS_GD=has_gd,
                          ACC_DTYPE=_acc(dtype), DOT_PRECISION=prec)
            k = triton.compile(ASTSource(fn, attention_signature(fn, dtype, consts), constexprs=consts), target=target,
                               options={"num_warps": warps, "num_stages": stages})
            print(f"{kind} {dtype}/{prec} D={d} tile {bm}x{bn} G={has_g:d} Gd={has_gd:d}: {ptxas_report(k.asm['ptx'])}")


def check_groupnorm(target, quick):
    dtypes = ["bf16", "fp32"] if quick else ["bf16", "fp16", "fp32", "fp64"]
    count = 0
    for dtype, one_tile, has_mask in itertools.product(dtypes, [True, False], [True, False]):
        consts = dict(BLOCK_C=8, BLOCK_S=256, ONE_TILE=one_tile, HAS_MASK=has_mask)
        fn = K._groupnorm_silu_dual_fwd_kernel
        triton.compile(ASTSource(fn, signature(fn, dtype, consts), constexprs=consts), target=target, options={"num_warps": 4})
        count += 1
        fn = K._groupnorm_silu_dual_bwd_kernel
        for has_gy, has_gyd in [(True, True), (True, False), (False, True)]:
            bwd = dict(consts, HAS_GY=has_gy, HAS_GYD=has_gyd)
            triton.compile(ASTSource(fn, signature(fn, dtype, bwd), constexprs=bwd), target=target, options={"num_warps": 4})
            count += 1
    print(f"compiled {count} GroupNorm+SiLU dual kernel variants for sm_90")


def check_attention_forward(target):
    """Forward and backward-preprocess kernels at D=64, default tiles, every precision path."""
    for dtype, prec in PRECISIONS:
        bm, bn, warps, stages = A._candidates("fwd", 64, 64, TORCH_DTYPE[dtype])[0]
        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, BLOCK_DV=64, ACC_DTYPE=_acc(dtype), DOT_PRECISION=prec)
        fn = A._attention_dual_fwd_kernel.fn
        k = triton.compile(ASTSource(fn, attention_signature(fn, dtype, consts), constexprs=consts), target=target,
                           options={"num_warps": warps, "num_stages": stages})
        print(f"fwd {dtype}/{prec} D=64 tile {bm}x{bn}: {ptxas_report(k.asm['ptx'])}")
        fn = A._attention_dual_bwd_preprocess_kernel
        pre = dict(BLOCK_M=64, BLOCK_DV=64, HAS_G=True, HAS_GD=True, ACC_DTYPE=_acc(dtype))
        triton.compile(ASTSource(fn, attention_signature(fn, dtype, pre), constexprs=pre), target=target, options={"num_warps": 4})


def main():
    quick = "--quick" in sys.argv
    target = GPUTarget("cuda", 90, 32)
    check_groupnorm(target, quick)
    check_attention_forward(target)
    check_attention(target, quick)


if __name__ == "__main__":
    main()
