"""C++ CPU kernel of the dual attention (sgflow._C, backend "cpp") vs the torch backend, by head width.

At a fixed width of 128 channels split into heads of ``--dims`` (16 x 256 tokens: a 16x16 feature map at
batch 16, the diffusers U-Net's and EDM's attention layers), q, k, v and their tangents laid out as a network
makes them (heads split off the channels: ``x.view(B, N, H, D).transpose(1, 2)``), each op timed on its own:

- ``cpp``:   ``torch.ops.sgflow.attention_dual_{fwd,bwd}_cpu`` (per head: score rows in registers / L1)
- ``torch``: ``sgflow.ops.attention._torch_forward`` / ``_torch_backward`` (batched products + elementwise passes)

Forward and backward (both cotangents given) are timed interleaved, call by call, in the same run; the table
gives medians (ms), the speed-up of cpp over torch and each one's GFLOP/s (the ops' registered FLOP formulas:
the same products in both). ``sgflow.ops.attention._CPP_MAX_HEAD_DIM`` (the automatic choice) comes from it.

Usage::

    python benchmarks/bench_cpp_attention.py --threads 1 --out benchmarks/results/cpp_attention.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_ROOT, "python"), _ROOT, os.path.dirname(os.path.abspath(__file__))]

from bench_cpp_gn_silu import _cpu_name, interleaved_medians  # noqa: E402

from sgflow.ops import attention as A  # noqa: E402
from sgflow.ops import cpp_ext  # noqa: E402


def bench_width(batch, tokens, channels, head, dtype, reps):
    heads = channels // head
    gen = torch.Generator().manual_seed(0)

    def split():
        return torch.randn(batch, tokens, channels, generator=gen).to(dtype).view(batch, tokens, heads, head).transpose(1, 2)

    q, k, v, qd, kd, vd, g, gd = (split() for _ in range(8))
    s = head ** -0.5
    cf, cb = torch.ops.sgflow.attention_dual_fwd_cpu, torch.ops.sgflow.attention_dual_bwd_cpu
    saved_c = cf(q, k, v, qd, kd, vd, s)
    saved_t = A._torch_forward(q, k, v, qd, kd, vd, s)
    fns = {
        "torch_fwd": lambda: A._torch_forward(q, k, v, qd, kd, vd, s),
        "cpp_fwd": lambda: cf(q, k, v, qd, kd, vd, s),
        "torch_bwd": lambda: A._torch_backward(q, k, v, qd, kd, vd, *saved_t, g, gd, s),
        "cpp_bwd": lambda: cb(q, k, v, qd, kd, vd, *saved_c, g, gd, s),
    }
    med = interleaved_medians(fns, reps)
    shape = tuple(q.shape)
    flops = {"fwd": A._fwd_flops(shape, tuple(k.shape), tuple(v.shape)),
             "bwd": A._bwd_flops(shape, tuple(k.shape), tuple(v.shape), *[None] * 7, tuple(g.shape), tuple(gd.shape))}
    row = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "ms": med, "gflops": {}}
    for key in ("fwd", "bwd"):
        row[f"speedup_{key}"] = med[f"torch_{key}"] / med[f"cpp_{key}"]
        for impl in ("torch", "cpp"):
            row["gflops"][f"{impl}_{key}"] = flops[key] / med[f"{impl}_{key}"] / 1e6
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--dims", default="8,16,32,64,128", help="head widths (comma list)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not cpp_ext.available():
        sys.exit(f"the C++ extension is unavailable: {cpp_ext.reason()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"{'heads x dim':>12} {'torch fwd':>9} {'cpp fwd':>8} {'x':>5} {'torch bwd':>9} {'cpp bwd':>8} {'x':>5}"
          f"  GFLOP/s torch / cpp (fwd, bwd)")
    for head in (int(d) for d in args.dims.split(",")):
        r = bench_width(args.batch, args.tokens, args.channels, head, dtype, args.reps)
        rows.append(r)
        ms, gf = r["ms"], r["gflops"]
        print(f"{args.channels // head:>5} x {head:<5} {ms['torch_fwd']:9.1f} {ms['cpp_fwd']:8.1f} {r['speedup_fwd']:5.2f}"
              f" {ms['torch_bwd']:9.1f} {ms['cpp_bwd']:8.1f} {r['speedup_bwd']:5.2f}  {gf['torch_fwd']:.1f} / "
              f"{gf['cpp_fwd']:.1f}, {gf['torch_bwd']:.1f} / {gf['cpp_bwd']:.1f}", flush=True)
    meta = {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "isa": cpp_ext.cpu_isa(),
            "torch": torch.__version__, "auto_cpp_max_head_dim": A._CPP_MAX_HEAD_DIM}
    print(meta)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
