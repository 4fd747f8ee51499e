"""Benchmark the dual GroupNorm -> SiLU op (and the fused GN -> SiLU -> Conv2d stage).

Implementations compared, for the dual forward (y, y_dot) and forward + backward (gradients of
<g, y> + <g_dot, y_dot> w.r.t. x, x_dot, gamma, beta):

- ``triton``: ``groupnorm_silu_dual(..., backend="triton")`` (GPU only)
- ``torch``:  ``groupnorm_silu_dual(..., backend="torch")`` (explicit formulas in PyTorch)
- ``jvp``:    ``torch.func.jvp`` of ``F.silu(F.group_norm(x, G, w, b))`` (+ autograd through it)

With ``--stage`` the same three are also timed for the whole GN -> SiLU -> Conv2d(3x3, Cout=C) stage
(``gn_silu_conv_dual`` vs jvp of the plain composition).

GPU: times are ``triton.testing.do_bench`` medians (ms). Achieved bandwidth = counted bytes / time,
where the counted bytes are the compulsory HBM traffic of the GN-SiLU op: forward reads x, x_dot and
writes y, y_dot (4 tensors); backward reads x, x_dot, g_y, g_ydot and writes g_x, g_xdot (6 tensors);
forward + backward = 10 tensors (parameters and statistics are negligible). It is reported next to
the device copy bandwidth measured by timing ``clone()`` of a 1 GiB tensor (read + write). Peak memory
is ``torch.cuda.max_memory_allocated`` during one call, minus what was allocated before it.

CPU (no CUDA): a simple timing (median of ``--reps`` wall-clock runs with ``time.perf_counter``, after
one warm-up) of the torch backend vs jvp on smaller shapes; no Triton and no bandwidth columns; peak
memory is the tensors one call makes, counted per op (``sgflow.memory.PeakTensorBytes``).
This is not a pytest-benchmark run.

Usage::

    python benchmarks/bench_groupnorm_silu.py --out runs/bench_gn_silu.csv   # or .json
    python benchmarks/bench_groupnorm_silu.py --dtype float32 --stage --quick
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_ROOT, "python"), _ROOT]  # this checkout, even without an install
from _timing import copy_bandwidth_gbs, peak_mib, time_ms  # noqa: E402
from sgflow.ops.groupnorm_silu import gn_silu_conv_dual, groupnorm_silu_dual  # noqa: E402

GPU_SHAPES = [(128, c, hw, 32) for c in (128, 256) for hw in (32, 16, 8)]  # (B, C, H=W, G), CIFAR U-Net
CPU_SHAPES = [(8, 128, 16, 32), (8, 256, 8, 32)]
EPS = 1e-5


def _make(shape, dtype, device, seed=0):
    B, C, HW, G = shape
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(B, C, HW, HW, device=device, dtype=dtype, generator=gen)
    xd = torch.randn(B, C, HW, HW, device=device, dtype=dtype, generator=gen)
    w = (1 + 0.1 * torch.randn(C, device=device, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(C, device=device, generator=gen)).to(dtype)
    gy = torch.randn_like(x)
    gyd = torch.randn_like(x)
    return x, xd, w, b, gy, gyd


def _gn_fns(impl, G):
    """(forward(x, xd, w, b) -> (y, yd)) for one implementation."""
    if impl == "jvp":
        def fwd(x, xd, w, b):
            return torch.func.jvp(lambda x: F.silu(F.group_norm(x, G, w, b, EPS)), (x,), (xd,))
        return fwd
    return lambda x, xd, w, b: groupnorm_silu_dual(x, xd, w, b, G, EPS, backend=impl)


def _stage_fns(impl, G, cw, cb):
    if impl == "jvp":
        def fwd(x, xd, w, b):
            return torch.func.jvp(lambda x: F.conv2d(F.silu(F.group_norm(x, G, w, b, EPS)), cw, cb, padding=1),
                                  (x,), (xd,))
        return fwd
    return lambda x, xd, w, b: gn_silu_conv_dual(x, xd, w, b, G, cw, cb, 1, EPS, backend=impl)


def _closures(fwd, x, xd, w, b, gy, gyd, extra_params=()):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, xd, w, b)]
    params = list(extra_params)

    def run_fwd():
        with torch.no_grad():
            return fwd(x, xd, w, b)

    def run_fwd_bwd():
        y, yd = fwd(*leaves)
        torch.autograd.backward((y, yd), (gy if y.shape == gy.shape else torch.ones_like(y),
                                          gyd if yd.shape == gyd.shape else torch.ones_like(yd)))
        for t in leaves + params:
            t.grad = None

    return run_fwd, run_fwd_bwd








def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write results to this .csv or .json path")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--stage", action="store_true", help="also time the GN -> SiLU -> Conv2d stage")
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions (GPU uses do_bench)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch.set_num_threads (1 avoids OpenMP spin-wait noise on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[:2]
    impls = ["triton", "torch", "jvp"] if device == "cuda" else ["torch", "jvp"]
    copy_bw = copy_bandwidth_gbs(device)
    rows = []
    for shape in shapes:
        B, C, HW, G = shape
        x, xd, w, b, gy, gyd = _make(shape, dtype, device)
        n_bytes = x.numel() * x.element_size()
        ops = [("gn_silu", impl, _gn_fns(impl, G), ()) for impl in impls]
        if args.stage:
            cw = (torch.randn(C, C, 3, 3, device=device) / (9 * C) ** 0.5).to(dtype).requires_grad_()
            cb = torch.zeros(C, device=device, dtype=dtype).requires_grad_()
            ops += [("stage", impl, _stage_fns(impl, G, cw, cb), (cw, cb)) for impl in impls]
        for op, impl, fwd, extra in ops:
            run_fwd, run_fwd_bwd = _closures(fwd, x, xd, w, b, gy, gyd, extra)
            for mode, fn, tensors in (("fwd", run_fwd, 4), ("fwd+bwd", run_fwd_bwd, 10)):
                ms = time_ms(fn, device, args.reps)
                gbs = tensors * n_bytes / (ms * 1e-3) / 1e9 if op == "gn_silu" else float("nan")
                rows.append(dict(op=op, impl=impl, mode=mode, B=B, C=C, H=HW, W=HW, G=G,
                                 dtype=str(dtype).split(".")[-1], device=device, ms=ms,
                                 counted_bytes=tensors * n_bytes if op == "gn_silu" else 0,
                                 achieved_gbs=gbs, copy_gbs=copy_bw,
                                 frac_of_copy=gbs / copy_bw if copy_bw == copy_bw else float("nan"),
                                 peak_mib=peak_mib(fn, device)))
        del x, xd, gy, gyd

    hdr = (f"{'op':8} {'impl':7} {'mode':8} {'B':>4} {'C':>4} {'HxW':>6} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
           f"{'peakMiB':>8}")
    print(f"device={device} dtype={dtype} copy_bw={copy_bw:.0f} GB/s "
          f"({'do_bench median' if device == 'cuda' else f'perf_counter median of {args.reps}'})")
    print(hdr)
    for r in rows:
        print(f"{r['op']:8} {r['impl']:7} {r['mode']:8} {r['B']:>4} {r['C']:>4} {str(r['H']) + 'x' + str(r['W']):>6} "
              f"{r['ms']:9.3f} {r['achieved_gbs']:8.1f} {100 * r['frac_of_copy']:6.1f} {r['peak_mib']:8.1f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.out.endswith(".json"):
            with open(args.out, "w") as f:
                # NaN (not measured, e.g. on CPU) is not valid JSON: write null.
                json.dump([{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                           for r in rows], f, indent=1)
        else:
            with open(args.out, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(rows[0]))
                wr.writeheader()
                wr.writerows(rows)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
