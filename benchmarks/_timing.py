"""Timing and memory helpers shared by the benchmark scripts (GPU: do_bench medians; CPU: perf_counter)."""
from __future__ import annotations

import statistics
import time

import torch


def peak_mib(fn, device) -> float:
    """Peak memory of one ``fn()`` above what was allocated before it, in MiB: the CUDA allocator's on GPU,
    on CPU the tensors ``fn`` makes, counted per op (sgflow.memory.PeakTensorBytes)."""
    if device != "cuda":
        from sgflow.memory import peak_tensor_bytes

        return peak_tensor_bytes(fn)["peak_bytes"] / 2**20
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_ms(fn, device, reps: int) -> float:
    """Median time of ``fn()`` in ms: ``triton.testing.do_bench`` on GPU, ``reps`` timed calls on CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def copy_bandwidth_gbs(device) -> float:
    """Device copy bandwidth (GB/s) from timing clone() of a 1 GiB tensor (bytes read + written)."""
    if device != "cuda":
        return float("nan")
    import triton.testing

    x = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    ms = triton.testing.do_bench(x.clone, return_mode="median")
    return 2 * 2**30 / (ms * 1e-3) / 1e9
