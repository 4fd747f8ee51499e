"""The fused SGFlow step against flow matching, eager and under ``torch.compile``, on one network and batch.

    python benchmarks/compile_step.py --network dit --shape 3,16,16 --batch 8                 # CPU, inductor
    python benchmarks/compile_step.py --device cuda --network dit --shape 3,32,32 --batch 64  # GPU

For each method (``flow_matching``, ``sgflow_fused``) and mode (``eager``, ``compiled``): the time of one
training step (loss, backward; no optimizer: what the compile changes), the median over ``--steps``
steps after the warm-up, the two modes of one method alternated step by step so that both see the same
machine load (GPU: ``triton.testing.do_bench`` medians instead); the first compiled call's time (trace and
compile); dynamo's graph breaks in that compile (its ``counters``); the bytes autograd keeps for
backward (``saved_tensors_hooks``, activations only); eager's ATen ops per step; on CUDA the peak memory of
one step. Ratios to flow matching in the same mode, and compiled to eager, in the table and the JSON
(``--out``). The fused step is ``sgflow.fused_loss`` on ``sgflow.dualize(model)``; compiled, its dual
forward is one graph node traced to ATen ops by AOTAutograd (``sgflow.autodual.traced``), the plan's
blocks tagged for recomputation by the partitioner (``--activation-budget`` sets inductor's own knob on top).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import sgflow
from sgflow.memory import count_aten_ops, saved_tensor_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testnets.py at the repository root
import testnets  # noqa: E402

METHODS = ("flow_matching", "sgflow_fused")


def _loss_fn(method, dual):
    if method == "flow_matching":
        return lambda model, x1, noise, t, u, split: sgflow.flow_matching_loss(model, x1, noise=noise, t=t)[0]
    return lambda model, x1, noise, t, u, split: sgflow.fused_loss(dual, x1, noise=noise, t=t, u=u, split=split)[0]


def _batch(shape, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(batch, *shape, generator=g)
    noise = torch.randn(batch, *shape, generator=g)
    t = torch.rand(batch, generator=g) * 0.9
    u = torch.clamp(t + torch.rand(batch, generator=g) * 0.5, max=1.0)
    split = torch.arange(batch) % 2 == 0
    return [a.to(device) for a in (x1, noise, t, u, split)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(method, model, batch, args, device) -> dict:
    dual = sgflow.dualize(model)
    loss_fn = _loss_fn(method, dual)
    params = [p for p in model.parameters() if p.requires_grad]

    def make_step(fn):
        def step():
            loss = fn(model, *batch)
            torch.autograd.backward(loss, inputs=params)
            return loss

        return step

    eager = make_step(loss_fn)
    eager()  # dualize's plan, first calls' caches
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_fn = torch.compile(loss_fn, backend=args.backend)
    compiled = make_step(compiled_fn)
    _sync(device)
    t0 = time.perf_counter()
    compiled()
    _sync(device)
    row = {"method": method, "compile_s": time.perf_counter() - t0}
    # dynamo's own record of this compile: the graph breaks (by reason) and the graphs it made.
    row["graph_breaks"] = sum(counters["graph_break"].values())
    row["break_reasons"] = sorted(counters["graph_break"])
    row["graphs"] = counters["stats"]["unique_graphs"]

    # The compiled step's loss and gradients against eager's (a benchmark of a wrong step would be worthless).
    grads = {}
    for mode, step in (("eager", eager), ("compiled", compiled)):
        for q in params:
            q.grad = None
        loss = step()
        grads[mode] = (float(loss), [q.grad.clone() for q in params])
    scale = max(float(g.abs().max()) for g in grads["eager"][1])
    row["loss_eager"], row["loss_compiled"] = grads["eager"][0], grads["compiled"][0]
    row["grad_max_err_rel"] = max(float((a - b).abs().max()) for a, b in zip(grads["compiled"][1], grads["eager"][1])) / scale

    for mode, fn in (("eager", lambda: loss_fn(model, *batch)), ("compiled", lambda: compiled_fn(model, *batch))):
        row[f"saved_bytes_{mode}"] = saved_tensor_bytes(fn)["bytes"]
    row["aten_ops_eager"] = count_aten_ops(eager)["ops"]

    if device.type == "cuda":
        from triton.testing import do_bench

        for mode, step in (("eager", eager), ("compiled", compiled)):
            row[f"step_ms_{mode}"] = do_bench(step, warmup=100, rep=args.rep_ms, return_mode="median")  # ms of each
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row[f"peak_bytes_{mode}"] = torch.cuda.max_memory_allocated() - base
    else:
        times = {"eager": [], "compiled": []}
        for i in range(args.warmup + args.steps):
            for mode, step in (("eager", eager), ("compiled", compiled)):
                t0 = time.perf_counter()
                step()
                if i >= args.warmup:
                    times[mode].append(time.perf_counter() - t0)
        for mode in times:
            row[f"step_ms_{mode}"] = 1e3 * statistics.median(times[mode])
    for p in params:
        p.grad = None
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--network", default="dit", choices=sorted(testnets.NETWORKS))
    p.add_argument("--shape", default="3,16,16", help="data shape without batch, e.g. 3,32,32 or 2")
    p.add_argument("--net-kw", default="{}", help="JSON constructor overrides, e.g. '{\"depth\": 6}'")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rep-ms", type=int, default=500, help="GPU: do_bench's measuring time per mode")
    p.add_argument("--threads", type=int, default=0, help="CPU: torch.set_num_threads (0: leave it)")
    p.add_argument("--activation-budget", type=float, default=None,
                   help="torch._functorch.config.activation_memory_budget (inductor's partitioner: 1.0 its default, "
                        "lower recomputes more to keep fewer activations)")
    p.add_argument("--out", default="benchmarks/results/compile_step.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.activation_budget is not None:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = args.activation_budget
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    model = testnets.build(args.network, shape, **json.loads(args.net_kw)).to(device)
    batch = _batch(shape, args.batch, device)
    rows = [measure(m, model, batch, args, device) for m in METHODS]
    fm = rows[0]
    for r in rows:
        for mode in ("eager", "compiled"):
            r[f"step_x_fm_{mode}"] = r[f"step_ms_{mode}"] / fm[f"step_ms_{mode}"]
            r[f"saved_x_fm_{mode}"] = r[f"saved_bytes_{mode}"] / max(fm[f"saved_bytes_{mode}"], 1)
        r["compiled_x_eager"] = r["step_ms_compiled"] / r["step_ms_eager"]
    print(f"# {device.type} {args.network} {shape} batch={args.batch} backend={args.backend} torch {torch.__version__} "
          f"threads={torch.get_num_threads()} activation_budget={args.activation_budget}")
    print(f"{'method':14} {'mode':9} {'step ms':>9} {'x FM':>6} {'saved MiB':>10} {'x FM':>6} {'compile s':>9} "
          f"{'breaks':>6} {'ATen ops':>8} {'grad err':>9}")
    for r in rows:
        for mode in ("eager", "compiled"):
            comp = f"{r['compile_s']:9.1f} {r['graph_breaks']:6d}" if mode == "compiled" else f"{'':9} {'':6}"
            ops = f"{r['aten_ops_eager']:8d}" if mode == "eager" else f"{'':8} {r['grad_max_err_rel']:9.1e}"
            print(f"{r['method']:14} {mode:9} {r[f'step_ms_{mode}']:9.1f} {r[f'step_x_fm_{mode}']:6.2f} "
                  f"{r[f'saved_bytes_{mode}'] / 2**20:10.2f} {r[f'saved_x_fm_{mode}']:6.2f} {comp} {ops}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
