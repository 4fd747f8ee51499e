"""Training-step time of fused SGFlow against flow matching, interleaved, per network.

    python benchmarks/step_time.py --network dit --net-kw '{"depth": 6, "hidden_size": 128}' --batch 16
    python benchmarks/step_time.py --suite issue18 --out runs/step_time.json   # every network of the README table
    python benchmarks/step_time.py --suite host --reps 20                      # tiny widths: host time only
    python benchmarks/step_time.py --network edm --reps 9 --ab 'off:sgflow.autodual.call.SKIP_DEAD_TAILS=False' --ab on:

One step is the loss and its backward (no optimizer: Adam's per-parameter work is the same for both
methods), on the same model, batch and process. Flow-matching and fused steps alternate (``--reps`` of
each, after one warm-up of each, which also makes ``sgflow.dualize``'s plan), and the table gives each
method's median, the ratio of the medians and the median of each rep's ratio (``paired``: a fused step
against the flow matching step just before it): alternating puts both methods under the same machine load,
which on a shared CPU moves single runs by tens of percent (two fused EDM steps in a row: 860 and 983 ms). CPU runs default to one thread
(``--threads``): a fused step's many smaller ops scale worse over threads than flow matching's, so the
one-thread ratio is the kernels' own. On CUDA each step is synchronised and timed by ``perf_counter``
(a step is long: ``do_bench``'s cache flush adds nothing). Results go to ``--out`` (JSON).

``--ab LABEL:module.attr=value;...`` (repeated): an A/B of library switches in one process: each variant sets its
switches (Python literals), makes its own plan, and its fused steps alternate with flow matching's and the other
variants' (the switches set again before each step), so all see the same machine load.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testnets*.py: the repository root
import sgflow  # noqa: E402
import sgflow.autodual.plan as plan_mod  # noqa: E402
import testnets  # noqa: E402
import testnets_diffusers  # noqa: E402
from sgflow.nn import build_model  # noqa: E402

# The networks of issue 18's acceptance at a memory-bound size (flow matching keeps >= 150-250 MiB).
SUITES = {
    "issue18": [
        ("adm", "3,32,32", {"channel_mult": [1, 2, 2], "num_res_blocks": 2}, 16),
        ("edm", "3,32,32", {}, 16),
        ("dit", "3,32,32", {"depth": 6, "hidden_size": 128}, 16),
        ("diffusers-unet", "3,32,32", {"block_out_channels": [64, 128, 128]}, 16),
        ("diffusers-dit", "3,32,32", {"num_layers": 6, "num_attention_heads": 4, "attention_head_dim": 32}, 16),
        ("cifar10", "3,32,32", {}, 16),
    ],
    # The same networks at tiny widths, 8x8, batch 2: the step is host time (Python, dispatch, launches),
    # what a GPU step of the fused path cannot go below.
    "host": [
        ("adm", "3,8,8", {}, 2),
        ("edm", "3,8,8", {}, 2),
        ("dit", "3,8,8", {}, 2),
        ("diffusers-unet", "3,8,8", {"block_out_channels": [32, 32, 32], "norm_num_groups": 8}, 2),
        ("diffusers-dit", "3,8,8", {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16}, 2),
        ("tiny", "3,8,8", {}, 2),
    ],
}


def build(name: str, shape: tuple, kw: dict):
    if name in testnets_diffusers.NETWORKS:
        return testnets_diffusers.build(name, shape, **kw)
    if name in testnets.NETWORKS:
        return testnets.build(name, shape, **kw)
    return build_model(name, shape)  # an sgflow.nn config (cifar10, tiny, ...)


def _model_and_batch(name: str, shape: tuple, kw: dict, batch: int, device: str):
    """The network (seed 0) and a data batch [batch, *shape] every run of the script makes alike."""
    torch.manual_seed(0)
    return build(name, shape, kw).to(device), torch.randn(batch, *shape, device=device)


def _ratios(fused_ms: list, fm_ms: list) -> dict:
    """The ratio of the medians and the median of each rep's ratio (a fused step against the flow matching step
    timed just before it: drifts of the machine's speed, other tenants or frequency, cancel in each pair, not
    between two medians)."""
    return {"ratio": statistics.median(fused_ms) / statistics.median(fm_ms),
            "paired_ratio": statistics.median(f / m for f, m in zip(fused_ms, fm_ms))}


def _step(model, x1, device: str, loss_fn, m, before=None):
    """One training step's closure: ``before()`` (a variant's switches), the loss of ``m`` and its backward."""
    def run():
        if before is not None:
            before()
        model.zero_grad(set_to_none=True)
        loss, _ = loss_fn(m, x1)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
    return run


def _alternate(steps: dict, reps: int) -> dict:
    """Each step once (warm-up: a fused one makes its plan), then ``reps`` rounds of every step in turn; ms per run."""
    for run in steps.values():
        run()
    times = {k: [] for k in steps}
    for rep in range(reps):
        for k, run in steps.items():
            # Every run of this script draws the same times and row splits (the fused step's two terms share
            # the batch by a random split, whose sizes move its time and FLOPs by a few percent).
            torch.manual_seed(1 + rep)
            t0 = time.perf_counter()
            run()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def _inplace_mm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(a_shape) * b_shape[-1]  # addmm_ / baddbmm_: the gradient accumulations of dual linears


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _sdpa_cpu_backward_flops(g_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(g_shape, q_shape, k_shape, v_shape)


def count_flops(run) -> int:
    """Matrix-product and convolution FLOPs of one ``run()`` (:class:`FlopCounterMode`, plus what it has no
    formula for: in-place ``addmm_`` / ``baddbmm_`` and SDPA's CPU kernels; sgflow's dual attention ops
    register their own). The time a step cannot go below at a fixed FLOP rate: its ratio against flow
    matching's is the floor of the step-time ratio, before elementwise work and overheads."""
    a = torch.ops.aten
    mapping = {a.addmm_: _inplace_mm_flops, a.baddbmm_: _inplace_mm_flops,
               a._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
               a._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        run()
    return fc.get_total_flops()


def measure(name: str, shape: tuple, kw: dict, batch: int, reps: int, device: str, budget: float = 0.5) -> dict:
    model, x1 = _model_and_batch(name, shape, kw, batch, device)
    dual = sgflow.dualize(model, budget=budget)
    steps = {"flow_matching": _step(model, x1, device, sgflow.flow_matching_loss, model),
             "sgflow_fused": _step(model, x1, device, sgflow.fused_loss, dual)}
    times = _alternate(steps, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = {}
    for k, run in steps.items():
        torch.manual_seed(1)
        flops[k] = count_flops(run)
    plan = getattr(dual, "plan", None)
    return {"network": name, "shape": list(shape), "net_kw": kw, "batch": batch, "reps": reps, "budget": budget,
            "fm_ms": med["flow_matching"], "fused_ms": med["sgflow_fused"],
            **_ratios(times["sgflow_fused"], times["flow_matching"]),
            "fm_gflop": flops["flow_matching"] / 1e9,
            "fused_gflop": flops["sgflow_fused"] / 1e9, "flop_ratio": flops["sgflow_fused"] / flops["flow_matching"],
            "fm_all_ms": times["flow_matching"],
            "fused_all_ms": times["sgflow_fused"], "blocks": list(plan.blocks) if plan is not None else None,
            "keep_attention": list(plan.keep) if plan is not None else None}


def _variant(text: str):
    """``"label:mod.attr=value;mod.attr=value"`` -> (label, [(module, attr, value)]), values Python literals."""
    label, _, sets = text.partition(":")
    out = []
    for item in filter(None, (a.strip() for a in sets.split(";"))):
        lhs, _, rhs = item.partition("=")
        mod, _, attr = lhs.strip().rpartition(".")
        module = importlib.import_module(mod)
        if not hasattr(module, attr):
            raise ValueError(f"--ab {text!r}: {mod} has no attribute {attr!r}")
        out.append((module, attr, ast.literal_eval(rhs.strip())))
    return label or "variant", out


def compare(name: str, shape: tuple, kw: dict, batch: int, reps: int, device: str, budget: float, variants) -> dict:
    """Fused steps of each variant (``(label, [(module, attr, value)])``) against flow matching in one process,
    alternating; per variant its median, ratio, paired ratio and plan."""
    model, x1 = _model_and_batch(name, shape, kw, batch, device)
    original = {(m, a): getattr(m, a) for _, sets in variants for m, a, _ in sets}

    def setting(sets):
        for (m, a), v in original.items():
            setattr(m, a, v)
        for m, a, v in sets:
            setattr(m, a, v)

    try:
        steps = {"flow_matching": _step(model, x1, device, sgflow.flow_matching_loss, model, lambda: setting([]))}
        duals = {}
        for label, sets in variants:
            setting(sets)
            duals[label] = sgflow.dualize(model, budget=budget)
            steps[label] = _step(model, x1, device, sgflow.fused_loss, duals[label], lambda sets=sets: setting(sets))
        times = _alternate(steps, reps)
    finally:
        setting([])
    rows = {}
    for label, _ in variants:
        plan = getattr(duals[label], "plan", None)
        rows[label] = {"ms": statistics.median(times[label]), **_ratios(times[label], times["flow_matching"]),
                       "blocks": list(plan.blocks) if plan is not None else None, "all_ms": times[label]}
    return {"network": name, "shape": list(shape), "net_kw": kw, "batch": batch, "reps": reps, "budget": budget,
            "fm_ms": statistics.median(times["flow_matching"]), "fm_all_ms": times["flow_matching"], "variants": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", help="a testnets / testnets_diffusers network or an sgflow.nn config")
    p.add_argument("--shape", default="3,32,32")
    p.add_argument("--net-kw", default="{}", help="JSON keyword arguments of the network's constructor")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--suite", choices=sorted(SUITES), help="run a list of networks instead of --network")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget", type=float, default=0.5,
                   help="sgflow.dualize's budget: peak memory as a fraction of flow matching's (more: less recomputed)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: leave torch's default)")
    p.add_argument("--keep-attention", type=int, choices=(0, 1), default=1,
                   help="0: plans never keep recomputed blocks' attention outputs (sgflow.autodual.plan.KEEP_ATTENTION)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ab", action="append", default=[], metavar="LABEL:module.attr=value;...",
                   help="an A/B variant of library switches (repeat it; see the module doc)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    threads, keep = torch.get_num_threads(), plan_mod.KEEP_ATTENTION
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    plan_mod.KEEP_ATTENTION = bool(args.keep_attention)
    try:
        return _run(p, args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests)
        plan_mod.KEEP_ATTENTION = keep


def _run(p, args):
    if args.suite:
        cases = SUITES[args.suite]
    elif args.network:
        cases = [(args.network, args.shape, json.loads(args.net_kw), args.batch)]
    else:
        p.error("give --network or --suite")
    rows = []
    if args.ab:
        variants = [_variant(v) for v in args.ab]
        print(f"# {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}, medians of {args.reps}, "
              f"variants alternating with flow matching in one process")
        print(f"{'network':<16} {'variant':<12} {'fused ms':>9} {'x FM':>6} {'paired':>6} {'blocks':>6}")
        for name, shape, kw, batch in cases:
            r = compare(name, tuple(int(s) for s in shape.split(",")), kw, batch, args.reps, args.device, args.budget,
                        variants)
            rows.append(r)
            for label, v in r["variants"].items():
                print(f"{name:<16} {label:<12} {v['ms']:9.1f} {v['ratio']:6.2f} {v['paired_ratio']:6.2f} "
                      f"{len(v['blocks'] or []):6d}", flush=True)
    else:
        _timed(args, cases, rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(),
                                        "torch": torch.__version__, "rows": rows}, indent=1))
    return rows


def _timed(args, cases, rows):
    print(f"# {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}, medians of {args.reps}; "
          f"FLOPs: matrix products and convolutions of one step")
    print(f"{'network':<16} {'batch':>5} {'FM ms':>9} {'fused ms':>9} {'x FM':>6} {'paired':>6} {'FLOPs x FM':>10}")
    for name, shape, kw, batch in cases:
        r = measure(name, tuple(int(s) for s in shape.split(",")), kw, batch, args.reps, args.device, args.budget)
        rows.append(r)
        print(f"{name:<16} {batch:>5} {r['fm_ms']:9.1f} {r['fused_ms']:9.1f} {r['ratio']:6.2f} {r['paired_ratio']:6.2f} "
              f"{r['flop_ratio']:10.2f}",
              flush=True)


if __name__ == "__main__":
    main()
