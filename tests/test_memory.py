"""sgflow.memory: the live-tensor-bytes tracker (exact on hand-made cases) and the peak-memory target on the
cifar10 U-Net (fused SGFlow at or below flow matching), measured on CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sgflow.memory import PeakTensorBytes, cpu_allocator_peak_bytes, peak_tensor_bytes

F32 = 4


def _load_benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"sgflow_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_new_storages_until_freed():
    def step():
        a = torch.ones(1000)  # live: 1000
        b = a * 2  # 2000
        del a  # 1000
        c = torch.zeros(3000)  # 4000 <- peak
        del b, c
        d = torch.zeros(500)  # 500
        return d

    res = peak_tensor_bytes(step)
    assert res["peak_bytes"] == 4000 * F32
    assert res["end_bytes"] == 500 * F32
    assert res["result"].shape == (500,)


def test_cpu_allocator_peak_counts_every_allocation():
    def step():
        a = torch.ones(1000)
        b = a * 2
        del a
        c = torch.zeros(3000)
        return b, c

    res = cpu_allocator_peak_bytes(step)
    assert res["peak_bytes"] == 4000 * F32
    assert res["result"][1].shape == (3000,)


def test_views_count_once_and_preexisting_storages_never():
    held = torch.zeros(10_000)

    def step():
        held.add_(1)  # in place on a tensor made before: not counted
        v = held[:5000].view(50, 100)  # a view of it: not counted either
        w = torch.ones(200)
        w2 = w.view(10, 20).t()  # same storage as w: counted once
        return v.sum() + w2.sum()

    res = peak_tensor_bytes(step)
    # ones(200), then the two scalar sums and their total (three 1-element storages at most alive)
    assert 200 * F32 <= res["peak_bytes"] <= 203 * F32
    assert res["end_bytes"] == 1 * F32


def test_sees_autograd_backward_and_func_transforms():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)

    def step():
        y = torch.tanh(x @ w)  # [32, 64] kept for backward
        _, y_dot = torch.func.jvp(lambda x: torch.tanh(x @ w.detach()), (x,), (torch.ones_like(x),))
        (y.sum() + y_dot.sum()).backward()  # w.grad [64, 64] is made by the backward

    with PeakTensorBytes() as mode:
        step()
    assert mode.current >= 64 * 64 * F32  # the gradient buffer outlives the step
    assert mode.peak >= (32 * 64 + 64 * 64) * F32
    assert mode.ops > 10
    w.grad = None


@pytest.mark.slow  # ~17 s each: `make test-slow`
@pytest.mark.parametrize("blocks", ["auto", "all"])
def test_fused_peak_memory_at_most_flow_matching_on_cifar10_unet(blocks):
    """The memory target, on CPU: one backward of the fused SGFlow loss on the cifar10 U-Net (53.7M
    parameters; 16x16 images, batch 4 to keep it quick) holds at most the tensor bytes that flow matching's
    holds at its peak. Gradient buffers exist before the step (as after the first step of training), so
    both peaks are activations and temporaries only."""
    # Both meters: tensors per op, and the allocator itself (kernel scratch included).
    peaks = _load_benchmark("peak_vs_allocator").measure_peaks("cifar10", 16, 4, blocks)
    (fm, fm_alloc), (fused, fused_alloc) = peaks["flow_matching"], peaks["sgflow_fused"]
    print(f"peak (blocks={blocks}), tensors / allocator: flow matching {fm / 2**20:.1f} / {fm_alloc / 2**20:.1f} MiB, "
          f"fused SGFlow {fused / 2**20:.1f} / {fused_alloc / 2**20:.1f} MiB ({fused / fm:.2f}x / {fused_alloc / fm_alloc:.2f}x)")
    assert fm > 50 * 2**20  # the network really ran (activations of 4 images through 53.7M params)
    assert fused <= 1.0 * fm
    assert fused_alloc <= 1.0 * fm_alloc


def test_memory_benchmark_script_writes_every_method_with_ratios(tmp_path, capsys):
    """benchmarks/memory.py (the paper's memory table) on a small CPU case: rows, ratios to flow matching and
    the printed table; the GPU check script relies on it."""
    import json

    bench = _load_benchmark("memory")
    out = tmp_path / "mem"
    bench.main(["--device", "cpu", "--config", "tiny", "--image-size", "8", "--batch", "2", "--steps", "1",
                "--warmup", "0", "--methods", "flow_matching,sgflow_reference,sgflow_fused", "--out", str(out)])
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"flow_matching", "sgflow_reference", "sgflow_fused"}
    assert rows["flow_matching"]["tracked_peak_bytes_ratio"] == 1.0
    assert rows["sgflow_reference"]["saved_bytes_ratio"] > 2 * rows["sgflow_fused"]["saved_bytes_ratio"]
    assert all(r["step_ms"] > 0 and r["tracked_peak_bytes"] > 0 for r in rows.values())
    table = capsys.readouterr().out
    assert "tracked peak MiB" in table and "sgflow_fused" in table
    assert out.with_suffix(".csv").read_text().startswith("method,")


def test_measuring_does_not_change_what_the_fused_ops_allocate():
    """add_unless_held adds in place into a fresh op output unless a dispatch mode may hold that output
    (selective checkpointing's cache); PeakTensorBytes only observes, so the sum stays in place under it
    (it used to go out of place and keep a second activation alive: measured peaks read high)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sgflow.ops.library import add_unless_held

    class Holding(TorchDispatchMode):  # stands for a mode that may keep op outputs
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    for mode, in_place in ((PeakTensorBytes(), True), (Holding(), False)):
        with mode:
            y = torch.ones(3)
            z = add_unless_held(y, torch.full((3,), 2.0))
        assert (z.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()) is in_place, type(mode).__name__
        assert torch.equal(z, torch.full((3,), 3.0))


def test_step_time_benchmark_script_interleaves_and_writes_ratios(tmp_path, capsys):
    """benchmarks/step_time.py on a small CPU case: both methods timed ``--reps`` times each, the ratio the
    ratio of the medians (and the median of each rep's ratio), the plan's blocks recorded, the FLOP ratio counted, the table printed (no timing
    asserted)."""
    import json
    import statistics

    bench = _load_benchmark("step_time")
    out = tmp_path / "steps.json"
    bench.main(["--network", "tiny", "--shape", "3,8,8", "--batch", "2", "--reps", "2", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert len(row["fm_all_ms"]) == len(row["fused_all_ms"]) == 2
    assert row["ratio"] == statistics.median(row["fused_all_ms"]) / statistics.median(row["fm_all_ms"])
    assert row["paired_ratio"] == statistics.median(f / m for f, m in zip(row["fused_all_ms"], row["fm_all_ms"]))
    assert row["blocks"] is not None
    assert row["fused_gflop"] > row["fm_gflop"] > 0  # what the FLOP column is made of (counted below)
    assert "tiny" in capsys.readouterr().out


def test_step_time_ab_sets_each_variants_switches_and_restores_them(tmp_path, capsys):
    """benchmarks/step_time.py --ab: each variant's switches are set for its plan and steps (its own plan made with
    them), every variant timed ``--reps`` times alternating with flow matching, the switches restored afterwards;
    a switch the module does not have is an error naming it."""
    import json

    import sgflow.autodual.call as call
    import sgflow.autodual.rules.fusions as fusions

    bench = _load_benchmark("step_time")
    out = tmp_path / "ab.json"
    seen = []
    real_fused = bench.sgflow.fused_loss

    def fused(m, x1):
        seen.append((call.SKIP_DEAD_TAILS, fusions.RESAMPLE))
        return real_fused(m, x1)

    bench.sgflow.fused_loss = fused
    try:
        bench.main(["--network", "tiny", "--shape", "3,8,8", "--batch", "2", "--reps", "2", "--out", str(out),
                    "--ab", "off:sgflow.autodual.call.SKIP_DEAD_TAILS=False;sgflow.autodual.rules.fusions.RESAMPLE=False",
                    "--ab", "on:"])
    finally:
        bench.sgflow.fused_loss = real_fused
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["variants"]) == {"off", "on"} and len(row["fm_all_ms"]) == 2
    assert all(len(v["all_ms"]) == 2 for v in row["variants"].values())
    assert seen == [(False, False), (True, True)] * 3  # warm-up, then two reps, alternating
    assert call.SKIP_DEAD_TAILS is True and fusions.RESAMPLE is True
    assert "off" in capsys.readouterr().out
    with pytest.raises(ValueError, match="NO_SUCH"):
        bench.main(["--network", "tiny", "--shape", "3,8,8", "--ab", "x:sgflow.autodual.call.NO_SUCH=1"])


def test_step_time_flop_count_includes_cpu_sdpa_and_in_place_products():
    """benchmarks/step_time.py's FLOP count: PyTorch's counter has no formula for SDPA's CPU kernels nor for
    ``addmm_`` (the dual linears' weight-gradient accumulation); the benchmark's count has both: 2 products
    forward, 5 backward (the scores recomputed) for SDPA, as PyTorch counts its GPU kernels."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    bench = _load_benchmark("step_time")
    b, h, n, d = 2, 3, 5, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=g).requires_grad_()
    acc, a, c = torch.zeros(6, 7), torch.randn(6, 3, generator=g), torch.randn(3, 7, generator=g)

    def run():
        F.scaled_dot_product_attention(q, q, q).sum().backward()
        acc.addmm_(a, c)

    product = 2 * b * h * n * n * d  # one [n, d] x [d, n] (or [n, n] x [n, d]) product per head
    assert bench.count_flops(run) == 7 * product + 2 * 6 * 3 * 7
    with FlopCounterMode(display=False) as plain:
        run()
    assert plain.get_total_flops() == 0  # what the benchmark adds is all of it here
