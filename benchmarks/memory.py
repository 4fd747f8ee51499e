"""The paper's memory table on one network and batch: every method, one full training step.

    python benchmarks/memory.py --device cuda --config cifar10 --batch 128      # GPU: peak memory + time
    python benchmarks/memory.py --device cpu --config tiny --batch 16            # CPU: saved bytes + time

GPU mode reports the peak CUDA memory of one training step (forward, backward, Adam step) and the
median step time over ``--steps`` steps after a warm-up. CPU mode reports the bytes saved for backward
(``saved_tensors_hooks``, deduplicated by storage: deterministic), the peak tensor bytes of one full
step over what was held before it (``sgflow.memory.PeakTensorBytes``: every ATen op's outputs counted
until freed, so gradients and temporaries too) and the median step time. ``--track-peak`` adds the
tracked peak on GPU as well, next to the allocator's, as a check of one against the other. Every
number is also given as a ratio to flow matching measured in the same run. Results go to
``--out`` (CSV and JSON).

Every device also reports ``aten_ops``: the ATen ops one full training step dispatches (forward,
backward, Adam step; counted by a ``TorchDispatchMode``, :class:`sgflow.memory.OpCounter`, on a step of
its own after the timed ones), the host-side work a step cannot go below on a GPU (each op is a launch
or a dispatch), with ``--op-breakdown N`` the N most dispatched ops per method. ``--wrap`` puts
``--network`` behind the thin flow-map wrapper users write (``forward(t, u, x)`` calling the backbone
held as ``self.net``): what ``sgflow.dualize``'s plan must see through. ``--network diffusers-unet`` /
``diffusers-dit`` are diffusers' ``UNet2DModel`` / ``DiTTransformer2DModel`` behind such a wrapper already
(``testnets_diffusers``; needs the ``diffusers`` package), ``--net-kw`` going to the diffusers constructor:

    python benchmarks/memory.py --device cpu --network diffusers-unet --shape 3,32,32 --batch 16 \\
        --net-kw '{"block_out_channels": [64, 128, 128]}' --methods flow_matching,sgflow_fused --op-breakdown 8
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import sgflow
from sgflow.memory import count_aten_ops, peak_tensor_bytes, saved_tensor_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testnets.py: the repository root, not the package
import testnets  # noqa: E402
import testnets_diffusers  # noqa: E402  (imports diffusers only when one of its networks is built)
from sgflow.nn import build_model

NETWORKS = sorted(testnets.NETWORKS) + sorted(testnets_diffusers.NETWORKS)


def _naive_meanflow(model, x1, **kw):
    """MeanFlow as a naive port does it: the JVP built with a graph, then detached."""
    b = sgflow.losses.common.draw_batch(x1, **kw)
    pred, dfdt = torch.func.jvp(lambda t, u, x: model(t, u, x), (b.t, b.u, b.xt), (torch.ones_like(b.t), torch.zeros_like(b.u), b.xdot))
    target = (b.xdot + sgflow.losses.common.bcast(b.u - b.t, dfdt) * dfdt).detach()
    return sgflow.losses.common.mean_sq(pred - target).mean(), {}


METHODS = {
    "flow_matching": sgflow.flow_matching_loss,
    "meanflow": sgflow.meanflow_loss,
    "meanflow_naive": _naive_meanflow,
    "meanflow_fused": sgflow.fused_meanflow_loss,
    "sgflow_reference": sgflow.sgflow_loss,
    # Through sgflow.dualize(model, blocks=--blocks, budget=--budget), built once per model.
    "sgflow_fused": lambda model, x1, **kw: sgflow.fused_loss(_dualized(model), x1, **kw),
    "lagrangian": sgflow.lagrangian_loss,
    "eulerian": sgflow.eulerian_loss,
    "progressive": sgflow.progressive_loss,
}


_DUALIZED: dict = {}
DUALIZE_KW: dict = {}  # set from --blocks / --budget


def _dualized(model):
    """One sgflow.dualize wrapper per model (block selection once, as a training loop would)."""
    if id(model) not in _DUALIZED:
        _DUALIZED[id(model)] = sgflow.dualize(model, **DUALIZE_KW)
    return _DUALIZED[id(model)]


class FlowMapWrapper(torch.nn.Module):
    """The thin wrapper a flow-map user writes around a backbone: ``forward(t, u, x)`` with the backbone
    held as ``self.net`` (``u - t`` rebuilt into the second time, as a wrapper feeding it to a class or
    extra embedding would)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, u, x):
        return self.net(t, t + (u - t), x)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_method(name, model, opt, x1, args, device):
    fn = METHODS[name]
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        loss, _ = fn(model, x1, generator=gen)
        return loss

    row = {"method": name}
    if device.type == "cpu":
        row["saved_bytes"] = saved_tensor_bytes(step)["bytes"]
    times = []
    for i in range(args.warmup + args.steps):
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _sync(device)
        t0 = time.perf_counter()
        loss = step()
        loss.backward()
        opt.step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                row["peak_bytes"] = max(row.get("peak_bytes", 0), torch.cuda.max_memory_allocated())
                row["peak_over_base_bytes"] = max(row.get("peak_over_base_bytes", 0), torch.cuda.max_memory_allocated() - base)
    row["step_ms"] = 1e3 * statistics.median(times)
    if args.track_peak or device.type == "cpu":
        # After the timed steps, so Adam's state already exists (held before the step, as on GPU).
        opt.zero_grad(set_to_none=True)

        def train_step():
            loss = step()
            loss.backward()
            opt.step()

        try:
            row["tracked_peak_bytes"] = peak_tensor_bytes(train_step)["peak_bytes"]
        except torch.OutOfMemoryError:  # keep the timed results of this method
            row["tracked_peak_error"] = "out of memory"
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    opt.zero_grad(set_to_none=True)

    def counted_step():
        loss = step()
        loss.backward()
        opt.step()

    counts = count_aten_ops(counted_step)
    row["aten_ops"] = counts["ops"]
    if args.op_breakdown:
        row["aten_ops_top"] = dict(counts["by_op"].most_common(args.op_breakdown))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default=None, help="network config (default: cifar10 on GPU, tiny on CPU)")
    p.add_argument("--network", default=None, choices=NETWORKS,
                   help="a third-party-style test network (testnets; diffusers-*: diffusers' own models behind a "
                        "flow-map wrapper, testnets_diffusers) instead of an sgflow.nn config")
    p.add_argument("--shape", default=None, help="data shape without batch for --network, e.g. 3,16,16 or 2")
    p.add_argument("--net-kw", default="{}", help="JSON constructor overrides for --network, e.g. '{\"depth\": 6}'")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--backend", default=None, help="SGFLOW_BACKEND for the fused ops (torch|triton|cuda)")
    p.add_argument("--blocks", default="auto", choices=("auto", "all", "none"),
                   help="sgflow_fused: sgflow.dualize's blocks recomputed in backward (default auto: measured)")
    p.add_argument("--budget", type=float, default=0.5,
                   help="sgflow_fused with --blocks auto: the estimated peak allowed, x flow matching's "
                        "estimated peak (default 0.5)")
    p.add_argument("--track-peak", action="store_true",
                   help="also count live tensor bytes per op on GPU (always on for CPU; slows that one step)")
    p.add_argument("--wrap", action="store_true",
                   help="--network behind a thin flow-map wrapper (forward(t, u, x) -> self.net(...))")
    p.add_argument("--op-breakdown", type=int, default=0, metavar="N",
                   help="also record the N most dispatched ATen ops of one step per method")
    p.add_argument("--out", default="benchmarks/results/memory")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.backend:
        import os

        os.environ["SGFLOW_BACKEND"] = args.backend
    config = args.config or ("cifar10" if device.type == "cuda" else "tiny")
    size = args.image_size or (32 if config == "cifar10" else 16)
    batch = args.batch or (128 if device.type == "cuda" else 8)
    torch.manual_seed(0)
    if args.network:
        shape = tuple(int(v) for v in (args.shape or f"3,{size},{size}").split(","))
        builder = testnets_diffusers.build if args.network in testnets_diffusers.NETWORKS else testnets.build
        model = builder(args.network, shape, **json.loads(args.net_kw)).to(device)
        config, size = args.network, "x".join(map(str, shape))
        if args.wrap:
            model, config = FlowMapWrapper(model), f"wrapped {config}"
    else:
        shape = (3, size, size)
        model = build_model(config, shape).to(device)
    DUALIZE_KW.update(blocks=args.blocks, budget=args.budget)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x1 = torch.randn(batch, *shape, device=device)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "config": config, "params": n_params,
            "batch": batch, "image_size": size, "torch": torch.__version__, "backend": args.backend or "auto",
            "blocks": args.blocks, "budget": args.budget, "net_kw": args.net_kw}
    rows = []
    for name in args.methods.split(","):
        try:
            rows.append(run_method(name, model, opt, x1, args, device))
        except torch.OutOfMemoryError:
            rows.append({"method": name, "error": "out of memory"})
            torch.cuda.empty_cache()
        print(rows[-1], file=sys.stderr, flush=True)
        columns = _add_ratios(rows, device)
        _write(Path(args.out), meta, rows)  # after every method: a run cut short by a timeout keeps its rows
    _print_table(meta, rows, columns, n_params)


def _add_ratios(rows, device):
    """Adds ``<key>_ratio`` (to flow matching of the same run) to every row; returns the table's columns."""
    ref = next((r for r in rows if r["method"] == "flow_matching" and "error" not in r), None)
    # (key, header, bytes per unit): GPU peak in GiB, CPU byte counts in MiB.
    columns = [("peak_bytes", "peak GiB", 2**30), ("tracked_peak_bytes", "tracked peak " + ("GiB" if device.type == "cuda" else "MiB"),
               2**30 if device.type == "cuda" else 2**20), ("saved_bytes", "saved MiB", 2**20), ("step_ms", "step ms", 1),
               ("aten_ops", "ATen ops", 1)]
    columns = [c for c in columns if any(c[0] in r for r in rows)]
    for r in rows:
        if ref and "error" not in r:
            for key, _, _ in columns:
                if key in r and key in ref:
                    r[f"{key}_ratio"] = r[key] / ref[key]
    return columns


def _write(out: Path, meta, rows):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    fields = sorted({k for r in rows for k in r if k != "aten_ops_top"}, key=lambda k: (k != "method", k))
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _print_table(meta, rows, columns, n_params):
    print(f"# {meta['device']}  config={meta['config']} ({n_params / 1e6:.1f}M params)  batch={meta['batch']}  "
          f"{meta['image_size']}  torch {meta['torch']}  blocks={meta['blocks']} budget={meta['budget']}")
    print(f"{'method':<18}" + "".join(f" {header:>{max(10, len(header))}} {'x FM':>6}" for _, header, _ in columns))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<18} {r['error']}")
            continue
        print(f"{r['method']:<18}" + "".join(f" {r.get(key, float('nan')) / unit:>{max(10, len(header))}.{1 if key == 'step_ms' else 0 if key == 'aten_ops' else 2}f} "
                                            f"{r.get(key + '_ratio', float('nan')):>6.2f}" for key, header, unit in columns))


if __name__ == "__main__":
    main()
