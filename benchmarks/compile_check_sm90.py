"""Compile the backward kernels for sm_90 without a GPU (Triton's offline compiler and its bundled ptxas):
the GroupNorm+SiLU dual backward for every dtype and flag combination, and the dual-attention dK/dV and dQ
kernels at their default tile configs with register/spill counts from ptxas. Catches kernels that the CPU
interpreter accepts but the GPU compiler rejects.

    python benchmarks/compile_check_sm90.py
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
        elif name.startswith("SCALE"):
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


def check_attention(target):
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for dtype, d, kind in itertools.product(["bf16", "fp32"], [64, 128], ["bwd_dkv", "bwd_dq"]):
        fn = A._attention_dual_bwd_dkv_kernel if kind == "bwd_dkv" else A._attention_dual_bwd_dq_kernel
        bm, bn, warps, stages = A._configs(kind, d, d, torch_dtype[dtype])[0]
        for has_g, has_gd in [(True, True), (True, False), (False, True)]:
            consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, BLOCK_DV=d, HAS_G=has_g, HAS_GD=has_gd,
                          ACC_DTYPE=triton.language.float32, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
            k = triton.compile(ASTSource(fn, attention_signature(fn, dtype, consts), constexprs=consts), target=target,
                               options={"num_warps": warps, "num_stages": stages})
            print(f"{kind} {dtype} D={d} tile {bm}x{bn} G={has_g:d} Gd={has_gd:d}: {ptxas_report(k.asm['ptx'])}")


def main():
    target = GPUTarget("cuda", 90, 32)
    check_attention(target)
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
