"""Step time and peak memory of the fused SGFlow loss on an sgflow.nn network under sgflow.dualize's
block policies, against flow matching; steps interleaved so that machine load affects every variant
alike; medians and ratios from the same run, JSON results.

    python benchmarks/dualize_blocks.py --config cifar10 --image-size 32 --batch 16 --reps 3 --peak

Variants: ``fm`` (flow_matching_loss), ``dual`` (fused_loss on sgflow.dualize(model): blocks chosen by
measurement, the default), ``dual_all`` (every outermost block recomputed), ``dual_noblocks`` (nothing
recomputed), ``dual_attn`` (only attention blocks recomputed: the policy of the hand-written dual
forwards that sgflow.nn had until they were deleted; benchmarks/NOTES.md has their last numbers),
``dual_savemm`` (every block recomputed except its convolution / matmul outputs, which are saved). Each
step is forward + backward (no optimizer step); wall time and process CPU time are both reported; the
first step of each variant (dualize's profile) is a warm-up. ``--peak`` adds one step under
PeakTensorBytes per variant.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import sgflow
from sgflow.memory import peak_tensor_bytes
from sgflow.nn import build_model
from sgflow.nn.unet import AttnBlock


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--variants", default="fm,dual,dual_all")
    p.add_argument("--peak", action="store_true")
    p.add_argument("--out", default="benchmarks/results/dualize_blocks.json")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = build_model(args.config, (3, args.image_size, args.image_size))
    x1 = torch.randn(args.batch, 3, args.image_size, args.image_size)
    all_variants = {
        "fm": (sgflow.flow_matching_loss, model),
        "dual": (sgflow.fused_loss, sgflow.dualize(model)),
        "dual_all": (sgflow.fused_loss, sgflow.dualize(model, blocks="all")),
        "dual_noblocks": (sgflow.fused_loss, sgflow.dualize(model, blocks="none")),
        # Only the attention blocks recomputed, as the deleted hand-written dual forwards did.
        "dual_attn": (sgflow.fused_loss, sgflow.dualize(model, blocks=[AttnBlock])),
        # Every block recomputed, but the convolution / matmul outputs saved (selective checkpointing).
        "dual_savemm": (sgflow.fused_loss, sgflow.dualize(model, save="matmul")),
    }
    names = args.variants.split(",")

    def step(name):
        fn, mod = all_variants[name]
        loss, _ = fn(mod, x1, generator=torch.Generator().manual_seed(0))
        loss.backward()
        model.zero_grad(set_to_none=True)

    for name in names:  # warm-up
        step(name)
    wall: dict = {n: [] for n in names}
    cpu: dict = {n: [] for n in names}
    for _ in range(args.reps):
        for name in names:
            c0, w0 = time.process_time(), time.perf_counter()
            step(name)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    rows = {n: {"wall_s": statistics.median(wall[n]), "cpu_s": statistics.median(cpu[n])} for n in names}
    if args.peak:
        for name in names:
            rows[name]["peak_mib"] = peak_tensor_bytes(lambda: step(name))["peak_bytes"] / 2**20
    for name in names:
        mod = all_variants[name][1]
        if isinstance(mod, sgflow.DualizedModel):
            rows[name]["recomputed_blocks"] = list(mod.blocks)
    ref = "fm" if "fm" in rows else names[0]
    print(f"# {args.config} {args.image_size}x{args.image_size} batch {args.batch}, median of {args.reps} interleaved steps")
    for name, r in rows.items():
        extra = f"  peak {r['peak_mib']:.1f} MiB ({r['peak_mib'] / rows[ref]['peak_mib']:.2f}x {ref})" if "peak_mib" in r else ""
        print(f"{name:14s} wall {r['wall_s']:8.3f} s ({r['wall_s'] / rows[ref]['wall_s']:.2f}x {ref})"
              f"  cpu {r['cpu_s']:8.3f} s ({r['cpu_s'] / rows[ref]['cpu_s']:.2f}x {ref}){extra}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
