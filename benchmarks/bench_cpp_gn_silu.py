"""C++ CPU kernels of dual GroupNorm -> SiLU (sgflow._C) vs the torch backend vs a plain copy.

On the cifar10 U-Net's GN+SiLU shapes (256 channels, 32 groups, 32x32 / 16x16 / 8x8; batch 8 on CPU),
each timed as forward + backward of the op level (the functions the autograd Functions call):

- ``cpp``:   ``sgflow.ops.cpp_ext.gn_silu_dual_fwd`` then ``gn_silu_dual_bwd`` (C++ kernels)
- ``torch``: ``_gn_silu_dual_fwd_torch`` then ``_gn_silu_dual_bwd_torch`` (the torch backend)
- ``copy``:  ``torch.empty_like(t).copy_(t)`` on tensors holding the bytes the op must move: the forward
  reads x, x_dot and writes y, y_dot (a copy of 2N elements reads and writes as much), the backward
  reads x, x_dot, g_y, g_ydot and writes g_x, g_xdot (a copy of 3N elements). Both allocate their
  outputs, as the ops do.

All of them are timed in the same run, interleaved call by call (on a shared machine, load then hits
them alike); the table gives medians (ms), the speed-up of cpp over torch and cpp's share of the copy
bandwidth (copy time / cpp time). Parameters and statistics ([C], [4, B, G]) are not counted.

Usage::

    python benchmarks/bench_cpp_gn_silu.py --out benchmarks/results/cpp_gn_silu.json
    python benchmarks/bench_cpp_gn_silu.py --threads 1 --isa all --reps 30
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_ROOT, "python"), _ROOT]  # this checkout, even without an install
from sgflow.ops import cpp_ext  # noqa: E402
from sgflow.ops.groupnorm_silu import _gn_silu_dual_bwd_torch, _gn_silu_dual_fwd_torch  # noqa: E402

SHAPES = [(8, 256, hw, 32) for hw in (32, 16, 8)]  # (B, C, H=W, G): cifar10 U-Net GN+SiLU, batch 8
EPS = 1e-5


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def interleaved_medians(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median wall time (ms) of each fn, timed round-robin so that machine load affects all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench_shape(B, C, HW, G, dtype, reps, isas):
    gen = torch.Generator().manual_seed(0)
    shape = (B, C, HW, HW)
    x, xd, gy, gyd = (torch.randn(shape, generator=gen).to(dtype) for _ in range(4))
    w = 1 + 0.1 * torch.randn(C, generator=gen)
    b = 0.1 * torch.randn(C, generator=gen)
    if dtype == torch.float64:
        w, b = w.double(), b.double()
    N = x.numel()
    src2 = torch.randn(2 * N, generator=gen).to(dtype)
    src3 = torch.randn(3 * N, generator=gen).to(dtype)
    stats_t = _gn_silu_dual_fwd_torch(x, xd, w, b, G, EPS)[2]
    stats_c = cpp_ext.gn_silu_dual_fwd(x, xd, w, b, G, EPS)[2]

    fns = {
        "torch_fwd": lambda: _gn_silu_dual_fwd_torch(x, xd, w, b, G, EPS),
        "torch_bwd": lambda: _gn_silu_dual_bwd_torch(x, xd, w, b, stats_t, gy, gyd, G),
        "copy_fwd": lambda: torch.empty_like(src2).copy_(src2),
        "copy_bwd": lambda: torch.empty_like(src3).copy_(src3),
    }
    for isa in isas:
        def fwd(isa=isa):
            cpp_ext.cpu_isa(isa)
            return cpp_ext.gn_silu_dual_fwd(x, xd, w, b, G, EPS)

        def bwd(isa=isa):
            cpp_ext.cpu_isa(isa)
            return cpp_ext.gn_silu_dual_bwd(x, xd, w, b, stats_c, gy, gyd, G)

        fns[f"cpp[{isa}]_fwd"] = fwd
        fns[f"cpp[{isa}]_bwd"] = bwd
    med = interleaved_medians(fns, reps)
    row = {"shape": list(shape), "groups": G, "dtype": str(dtype).replace("torch.", ""),
           "bytes_fwd": 4 * N * x.element_size(), "bytes_bwd": 6 * N * x.element_size(), "ms": med}
    row["ms"]["torch"] = med["torch_fwd"] + med["torch_bwd"]
    row["ms"]["copy"] = med["copy_fwd"] + med["copy_bwd"]
    for isa in isas:
        row["ms"][f"cpp[{isa}]"] = med[f"cpp[{isa}]_fwd"] + med[f"cpp[{isa}]_bwd"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--isa", default="default", help="'default', 'all', or a comma list of base,avx2,avx512")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not cpp_ext.available():
        sys.exit(f"bench_cpp_gn_silu: {cpp_ext.reason()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    default_isa = cpp_ext.cpu_isa()
    if args.isa == "default":
        isas = [default_isa]
    else:
        wanted = ["base", "avx2", "avx512"] if args.isa == "all" else args.isa.split(",")
        isas = []
        for name in wanted:
            try:
                cpp_ext.cpu_isa(name)
                isas.append(name)
            except RuntimeError:
                print(f"(skipping {name}: not supported by this CPU)")
        cpp_ext.cpu_isa(default_isa)
    dtype = getattr(torch, args.dtype)
    info = {"command": " ".join(["python", "benchmarks/bench_cpp_gn_silu.py", *(argv or sys.argv[1:])]),
            "cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "default_isa": default_isa, "reps": args.reps}
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, {args.dtype}, "
          f"medians of {args.reps} interleaved runs (ms), forward + backward")
    hdr = f"{'shape [B,C,H,W] G':24s} {'torch':>8s} {'copy':>7s}"
    for isa in isas:
        hdr += f" | {'cpp[' + isa + ']':>12s} {'fwd':>6s} {'bwd':>6s} {'vs torch':>8s} {'% copy':>6s}"
    print(hdr)
    rows = []
    try:
        for B, C, HW, G in SHAPES:
            row = bench_shape(B, C, HW, G, dtype, args.reps, isas)
            ms = row["ms"]
            line = f"{str(row['shape']) + ' ' + str(G):24s} {ms['torch']:8.2f} {ms['copy']:7.2f}"
            row["speedup_vs_torch"], row["copy_fraction"] = {}, {}
            for isa in isas:
                c = ms[f"cpp[{isa}]"]
                row["speedup_vs_torch"][isa] = ms["torch"] / c
                row["copy_fraction"][isa] = ms["copy"] / c
                line += (f" | {c:12.2f} {ms[f'cpp[{isa}]_fwd']:6.2f} {ms[f'cpp[{isa}]_bwd']:6.2f} "
                         f"{ms['torch'] / c:7.2f}x {100 * ms['copy'] / c:5.0f}%")
            print(line, flush=True)
            rows.append(row)
    finally:
        cpp_ext.cpu_isa(default_isa)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**info, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
