"""The Triton kernels compile for an H100/H200 (sm_90) on a machine without a GPU.

The CPU suite runs the kernels through Triton's interpreter, which accepts code the GPU compiler
rejects; this compiles the real thing offline (Triton's compiler and its bundled ptxas), in a
subprocess because the interpreter flag is process-wide.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _offline_compiler_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


@pytest.mark.skipif(not _offline_compiler_available(), reason="needs triton's NVIDIA backend (ptxas) to compile offline")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check_sm90.py"), "--quick"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 32 GroupNorm+SiLU dual kernel variants" in out.stdout
    # Every precision path of the attention launchers, for the forward and both backward kernels.
    paths = ["fp32/tf32x3", "fp32/ieee", "fp32/tf32", "fp16/tf32", "bf16/tf32", "fp64/tf32"]
    for kind in ("fwd", "bwd_dkv", "bwd_dq"):
        for path in paths:
            assert out.stdout.count(f"{kind} {path} D=64") == 1, (kind, path, out.stdout)
