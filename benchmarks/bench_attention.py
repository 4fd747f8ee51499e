"""Benchmark dual (primal + tangent) softmax attention.

Implementations compared, for the dual forward (o, o_dot) and forward + backward (gradients of
<g, o> + <g_dot, o_dot> w.r.t. q, k, v, q_dot, k_dot, v_dot):

- ``triton``: ``attention_dual(..., backend="triton")`` (flash-style kernels, GPU only)
- ``torch``:  ``attention_dual(..., backend="torch")`` (explicit formulas, query-row chunks)
- ``jvp``:    ``torch.func.jvp`` of ``softmax(scale q k^T) v`` (+ autograd through it)

Sweeps (GPU):

- ``unet``: U-Net self-attention shapes, B=``--batch`` (128), heads x head-dim from ``--heads`` and
  ``--dims``, N = ``--seqs`` (256 = 16x16, 1024 = 32x32 feature maps).
- ``memory``: peak memory (and time) vs sequence length at B=``--mem-batch``, H=4, D=64, for
  N in ``--mem-seqs``; the N^2 terms of the jvp path show up here.

GPU: times are ``triton.testing.do_bench`` medians (ms); peak memory is
``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it (inputs
excluded). Out-of-memory cases are recorded as ``oom`` with NaN numbers.
CPU (no CUDA): median of ``--reps`` ``time.perf_counter`` runs of the torch paths on small shapes;
peak memory is the tensors one call makes, counted per op (``sgflow.memory.PeakTensorBytes``).
``SGFLOW_ATTENTION_AUTOTUNE=1`` makes the Triton launchers time their tile candidates first.

Usage::

    python benchmarks/bench_attention.py --out runs/bench_attention        # dir: .csv + .json
    python benchmarks/bench_attention.py --out runs/attn.json --quick --dtype float16
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_ROOT, "python"), _ROOT]  # this checkout, even without an install
from _timing import peak_mib, time_ms  # noqa: E402
from sgflow.ops.attention import attention_dual  # noqa: E402


def plain_attention(q, k, v):
    s = (q.shape[-1] ** -0.5) * (q @ k.transpose(-1, -2))
    return torch.softmax(s, dim=-1) @ v


def _make(b, h, n, d, dtype, device, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    ins = [torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen) for _ in range(6)]
    cot = [torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen) for _ in range(2)]
    return ins, cot


def _fwd_fn(impl):
    if impl == "jvp":
        return lambda q, k, v, qd, kd, vd: torch.func.jvp(plain_attention, (q, k, v), (qd, kd, vd))
    return lambda *xs: attention_dual(*xs, backend=impl)


def _closures(impl, ins, cot):
    fwd = _fwd_fn(impl)
    leaves = [t.detach().clone().requires_grad_(True) for t in ins]

    def run_fwd():
        with torch.no_grad():
            return fwd(*ins)

    def run_fwd_bwd():
        o, od = fwd(*leaves)
        torch.autograd.backward((o, od), tuple(cot))
        for t in leaves:
            t.grad = None

    return run_fwd, run_fwd_bwd






def _measure(sweep, impl, b, h, n, d, dtype, device, reps):
    rows = []
    try:
        ins, cot = _make(b, h, n, d, dtype, device)
    except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
        return rows
    run_fwd, run_fwd_bwd = _closures(impl, ins, cot)
    for mode, fn in (("fwd", run_fwd), ("fwd+bwd", run_fwd_bwd)):
        status, ms, peak = "ok", float("nan"), float("nan")
        try:
            fn()  # compile (and autotune) outside the measurements
            peak = peak_mib(fn, device)
            ms = time_ms(fn, device, reps)
        except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
            status = "oom"
        if device == "cuda":
            torch.cuda.empty_cache()
        rows.append(dict(sweep=sweep, impl=impl, mode=mode, B=b, H=h, N=n, D=d,
                         dtype=str(dtype).split(".")[-1], device=device, status=status, ms=ms,
                         peak_mib=peak))
    del ins, cot, run_fwd, run_fwd_bwd
    return rows


def _add_speedups(rows):
    """speedup_vs_jvp = jvp time / this time for the same (sweep, mode, shape)."""
    key = lambda r: (r["sweep"], r["mode"], r["B"], r["H"], r["N"], r["D"])  # noqa: E731
    jvp = {key(r): r["ms"] for r in rows if r["impl"] == "jvp"}
    for r in rows:
        ref = jvp.get(key(r), float("nan"))
        r["speedup_vs_jvp"] = ref / r["ms"] if r["ms"] == r["ms"] and r["ms"] > 0 else float("nan")


def _write(rows, out):
    if out.endswith(".json") or out.endswith(".csv"):
        paths = [out]
    else:
        os.makedirs(out, exist_ok=True)
        paths = [os.path.join(out, "bench_attention.csv"), os.path.join(out, "bench_attention.json")]
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if path.endswith(".json"):
            with open(path, "w") as f:
                # NaN (not measured) is not valid JSON: write null.
                json.dump([{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                           for r in rows], f, indent=1)
        else:
            with open(path, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(rows[0]))
                wr.writeheader()
                wr.writerows(rows)
        print(f"wrote {path}")


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help=".csv or .json path, or a directory (both files)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="U-Net sweep batch (GPU 128, CPU 4)")
    ap.add_argument("--heads", type=_ints, default=None, help="comma list (GPU 1,2,4; CPU 2)")
    ap.add_argument("--dims", type=_ints, default=None, help="comma list (GPU 64,128,256; CPU 64)")
    ap.add_argument("--seqs", type=_ints, default=None, help="comma list (GPU 256,1024; CPU 64,256)")
    ap.add_argument("--mem-batch", type=int, default=8)
    ap.add_argument("--mem-seqs", type=_ints, default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--no-memory-sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one head count and head dim, no memory sweep")
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions (GPU uses do_bench)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    batch = args.batch or (128 if gpu else 4)
    heads = args.heads or ([1, 2, 4] if gpu else [2])
    dims = args.dims or ([64, 128, 256] if gpu else [64])
    seqs = args.seqs or ([256, 1024] if gpu else [64, 256])
    if args.quick:
        heads, dims = heads[-1:], dims[:1]
    impls = ["triton", "torch", "jvp"] if gpu else ["torch", "jvp"]

    rows = []
    for n in seqs:
        for h in heads:
            for d in dims:
                for impl in impls:
                    rows += _measure("unet", impl, batch, h, n, d, dtype, device, args.reps)
    if gpu and not (args.quick or args.no_memory_sweep):
        for n in args.mem_seqs:
            for impl in impls:
                rows += _measure("memory", impl, args.mem_batch, 4, n, 64, dtype, device, args.reps)
    _add_speedups(rows)

    timing = "do_bench median" if gpu else f"perf_counter median of {args.reps}"
    print(f"device={device} dtype={dtype} ({timing}; peak = extra allocated MiB during one call)")
    print(f"{'sweep':6} {'impl':6} {'mode':7} {'B':>4} {'H':>2} {'N':>5} {'D':>4} {'ms':>9} {'xjvp':>6} {'peakMiB':>9}")
    for r in rows:
        ms = "oom" if r["status"] == "oom" else f"{r['ms']:9.3f}"
        print(f"{r['sweep']:6} {r['impl']:6} {r['mode']:7} {r['B']:>4} {r['H']:>2} {r['N']:>5} {r['D']:>4} "
              f"{ms:>9} {r['speedup_vs_jvp']:6.2f} {r['peak_mib']:9.1f}")
    if args.out and rows:
        _write(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
