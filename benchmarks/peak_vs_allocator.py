"""Check sgflow.memory.PeakTensorBytes against the CPU allocator on a U-Net training step.

The tracker counts op outputs at op boundaries; the allocator's own record (torch.profiler memory
events: every allocation and free with its size; sgflow.memory.cpu_allocator_peak_bytes) also sees
scratch memory inside kernels. Both are
run on the same step (gradient buffers made beforehand, so both peaks are activations + temporaries),
for flow matching and fused SGFlow, and their ratios compared.

    python benchmarks/peak_vs_allocator.py --config cifar10 --image-size 16 --batch 4
"""
from __future__ import annotations

import argparse

import torch
import sgflow
from sgflow.memory import cpu_allocator_peak_bytes, peak_tensor_bytes
from sgflow.nn import build_model


def measure_peaks(config: str, image_size: int, batch: int, blocks: str = "auto") -> dict:
    """``{"flow_matching" | "sgflow_fused": (tracked peak bytes, allocator peak bytes)}`` of one step
    (loss + backward) each on the same network and batch, gradient buffers made beforehand."""
    torch.manual_seed(0)
    shape = (3, image_size, image_size)
    model = build_model(config, shape)
    dual = sgflow.dualize(model, blocks=blocks)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    x1 = torch.randn(batch, *shape)
    rows = {}
    for name, loss_fn, m in [("flow_matching", sgflow.flow_matching_loss, model), ("sgflow_fused", sgflow.fused_loss, dual)]:
        def step():
            loss, _ = loss_fn(m, x1, generator=torch.Generator().manual_seed(0))
            loss.backward()

        step()  # dualize's block choice (a profile, once) happens on the first call

        rows[name] = (peak_tensor_bytes(step)["peak_bytes"], cpu_allocator_peak_bytes(step)["peak_bytes"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cifar10")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--blocks", default="auto", choices=("auto", "all", "none"), help="sgflow.dualize's recomputed blocks")
    args = p.parse_args(argv)
    rows = measure_peaks(args.config, args.image_size, args.batch, args.blocks)
    print(f"# {args.config} U-Net, {args.image_size}x{args.image_size}, batch {args.batch}, blocks={args.blocks}, "
          f"CPU, torch {torch.__version__}")
    print(f"{'method':<15} {'tracked MiB':>12} {'allocator MiB':>14} {'tracked/alloc':>14}")
    for name, (tracked, alloc) in rows.items():
        print(f"{name:<15} {tracked / 2**20:>12.2f} {alloc / 2**20:>14.2f} {tracked / alloc:>14.3f}")
    (tf, af), (ts, as_) = rows["flow_matching"], rows["sgflow_fused"]
    print(f"fused / flow matching: tracked {ts / tf:.3f}, allocator {as_ / af:.3f}")


if __name__ == "__main__":
    main()
