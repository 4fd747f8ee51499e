"""The CUDA C++ kernels (csrc/gn_silu_dual_cuda.cu) compile for an H100/H200 (sm_90) without a GPU.

The .cu includes CUDA headers only, so nvcc compiles it on any machine with a CUDA toolkit, even where
torch is a CPU build (whose CUDA headers are incomplete). ptxas reports registers and spills per
kernel; none may spill. The torch binding of the kernels (gn_silu_dual_cuda_binding.cpp), built only
against a CUDA torch, is syntax-checked with the host compiler against torch's headers plus a stub for
the one header a CPU wheel lacks. Running the kernels needs a GPU (tests/ops/test_cpp_ext.py runs the
CPU ones; the CUDA ones run wherever torch.cuda and the CUDA build exist).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
HAS_NVCC = NVCC is not None and os.path.exists(NVCC)


def _cuda_include_dir() -> str | None:
    for base in (os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(os.path.realpath(NVCC or "")))
                 if HAS_NVCC else None, "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "include", "cuda_runtime_api.h")):
            return os.path.join(base, "include")
    return None


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """{kernel (demangled-ish name): {registers, spill_stores, spill_loads, stack}} from ptxas -v output."""
    kernels, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
    return kernels


def _short(mangled: str) -> str:
    """bwd_kernel<float, true>-style label from the mangled name."""
    kind = "fwd_kernel" if "fwd_kernel" in mangled else "bwd_kernel"
    m = re.search(kind + r"I(.+?)Lb([01])EEEv", mangled)
    if not m:
        return mangled
    dtype = {"f": "float", "d": "double", "6__half": "half", "13__nv_bfloat16": "bfloat16"}.get(m.group(1), m.group(1))
    return f"{kind}<{dtype}, cache={'true' if m.group(2) == '1' else 'false'}>"


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME)")
def test_cuda_kernels_compile_for_sm90_without_spills(tmp_path):
    cmd = [NVCC, "-arch=sm_90", "-O3", "-std=c++17", "-c", "--resource-usage", str(CSRC / "gn_silu_dual_cuda.cu"),
           "-o", str(tmp_path / "gn_silu_dual_cuda.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    usage = parse_resource_usage(out.stdout + out.stderr)
    # 4 dtypes x (forward, backward) x (shared-memory cache or not)
    assert len(usage) == 16, sorted(usage)
    print()
    print(f"{'kernel (sm_90)':44s} {'registers':>9s} {'spill st':>8s} {'spill ld':>8s} {'stack':>5s}")
    for name, u in sorted(usage.items(), key=lambda kv: _short(kv[0])):
        print(f"{_short(name):44s} {u['registers']:9d} {u['spill_stores']:8d} {u['spill_loads']:8d} {u['stack']:5d}")
    spilled = {_short(k): u for k, u in usage.items() if u["spill_stores"] or u["spill_loads"]}
    assert not spilled, spilled
    # __launch_bounds__(512): at most 128 registers a thread
    assert max(u["registers"] for u in usage.values()) <= 128


@pytest.mark.skipif(not HAS_NVCC or _cuda_include_dir() is None, reason="needs nvcc and the CUDA headers")
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """Syntax check of the torch side of the CUDA kernels with the host compiler. A CPU wheel of torch
    ships c10/cuda but not the generated c10/cuda/impl/cuda_cmake_macros.h: an empty stub stands in."""
    torch = pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [f"-I{p}" for p in [str(tmp_path / "stub"), *include_paths(), _cuda_include_dir(), str(CSRC)]]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DSGFLOW_WITH_CUDA", *includes,
           str(CSRC / "gn_silu_dual_cuda_binding.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr[-4000:]}"
    del torch
