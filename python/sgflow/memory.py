"""What a training step keeps for backward and its peak tensor memory, measured on any device (CPU included)."""
from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def saved_tensor_bytes(step: Callable[[], torch.Tensor]) -> dict:
    """Run ``step()`` (which builds a graph and returns the loss) and count what autograd saved.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` is counted once per
    underlying storage (views and re-saves of one buffer are not double counted). Parameters are
    counted separately, since every method keeps them anyway.

    Returns ``{"bytes": activations saved, "param_bytes": parameters saved, "tensors": count, "loss": loss}``.
    """
    seen: dict[tuple, int] = {}
    param_ptrs: set = set()

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device.type, t.device.index)
            if storage.data_ptr() != 0:
                seen[key] = max(seen.get(key, 0), storage.nbytes())
                if isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad):
                    param_ptrs.add(key)
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functorch wrappers)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    act = sum(n for k, n in seen.items() if k not in param_ptrs)
    par = sum(n for k, n in seen.items() if k in param_ptrs)
    return {"bytes": act, "param_bytes": par, "tensors": len(seen), "loss": loss}


class PeakTensorBytes(TorchDispatchMode):
    """Live tensor bytes over time, on any device, as a dispatch mode: ``with PeakTensorBytes() as m: ...``.

    After every ATen op, the storages of its outputs that are new are counted until they are freed;
    ``m.peak`` is the largest total seen at an op boundary, ``m.current`` what is still live at exit.
    Storages that existed before the mode was entered (parameters, optimizer state, the data batch,
    tensors held by the caller) are never counted, even when an in-place op returns them, and freeing
    them inside the region does not lower the count: this measures what the region allocates, as
    ``torch.cuda.max_memory_allocated() - memory_allocated()`` does for a region that frees nothing it
    did not make, without the caching allocator's block rounding.

    Not seen: memory an op allocates and frees inside its kernel (convolution scratch, library
    workspaces) and tensors made without a dispatched op (``torch.tensor(list)``, ``from_numpy``,
    another thread). Storages without data (sparse tensors, meta tensors) are skipped. Against the
    CPU allocator's own peak (:func:`cpu_allocator_peak_bytes`) on the U-Net training steps measured
    it reads 2-12% lower: kernel scratch at the peak (benchmarks/NOTES.md). Ops run by autograd's
    backward and inside ``torch.func`` transforms are seen. One instance per region; the mode adds a Python call per op, so time the
    region without it.
    """

    sgflow_observer = True  # holds no op outputs: sgflow's fused ops may still write into them in place

    def __init__(self) -> None:
        super().__init__()
        self._counted: dict[int, tuple[StorageWeakRef, int]] = {}  # storage impl -> (weak ref, bytes)
        self._external: dict[int, StorageWeakRef] = {}  # storages first seen as inputs: made outside
        self._lock = threading.Lock()  # autograd may run backward ops on its device threads
        self.current = 0
        self.peak = 0
        self.ops = 0

    @staticmethod
    def _storage(t: torch.Tensor):
        if t.device.type == "meta" or t.layout != torch.strided:
            return None
        try:
            return t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensors without a storage
            return None

    def _forget_freed(self) -> None:
        for key in [k for k, (ref, _) in self._counted.items() if ref.expired()]:
            self.current -= self._counted.pop(key)[1]
        for key in [k for k, ref in self._external.items() if ref.expired()]:
            del self._external[key]

    def __enter__(self):
        if self.ops:
            raise RuntimeError("PeakTensorBytes measures one region: make a new instance for another")
        return super().__enter__()

    def __exit__(self, *exc):
        with self._lock:
            self._forget_freed()  # what the region's locals held is gone once it returned
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with self._lock:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and (storage := self._storage(t)) is not None:
                    ref = StorageWeakRef(storage)
                    if ref.cdata not in self._counted:
                        self._external.setdefault(ref.cdata, ref)
        out = func(*args, **(kwargs or {}))
        with self._lock:
            self.ops += 1
            self._forget_freed()  # what the caller dropped since the last op is gone before these outputs
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor) or (storage := self._storage(t)) is None:
                    continue
                ref = StorageWeakRef(storage)
                if ref.cdata in self._external:
                    continue
                old = self._counted[ref.cdata][1] if ref.cdata in self._counted else 0
                # Re-read the size of storages already counted too: resize_ and out= ops grow them.
                self._counted[ref.cdata] = (ref, storage.nbytes())
                self.current += storage.nbytes() - old
            self.peak = max(self.peak, self.current)
        return out


def peak_tensor_bytes(step: Callable[[], object]) -> dict:
    """Run ``step()`` under :class:`PeakTensorBytes`; return ``{"peak_bytes", "end_bytes", "ops", "result"}``.

    ``peak_bytes``: the most bytes of tensors created by ``step`` that were alive at once (activations,
    gradients, temporaries); ``end_bytes``: those still alive when it returned (e.g. ``.grad`` buffers).
    Pass a whole training step (forward, backward, optimizer step) to get its peak over the memory held
    before it.
    """
    with PeakTensorBytes() as mode:
        result = step()
    return {"peak_bytes": mode.peak, "end_bytes": mode.current, "ops": mode.ops, "result": result}


class OpCounter(TorchDispatchMode):
    """ATen ops dispatched in a region, in total and per op: ``with OpCounter() as c: ...``; ``c.ops``,
    ``c.by_op`` (a ``Counter`` of op names such as ``"aten.mul.Tensor"``).

    Every op that reaches the dispatcher's Python mode is counted once: the forward's, autograd's
    backward's (its device threads included) and an optimizer's. Ops decomposed before dispatch
    (CompositeImplicit ops: ``F.linear`` is counted as the ``addmm`` / ``view`` it becomes) are counted as
    what they become; what runs inside one kernel is one op. On a GPU each op is (at least) a launch or a
    dispatch: the host-side cost of a step. One instance per region.
    """

    sgflow_observer = True  # holds no op outputs

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter = Counter()
        self._lock = threading.Lock()

    @property
    def ops(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with self._lock:
            self.by_op[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(step: Callable[[], object]) -> dict:
    """Run ``step()`` under :class:`OpCounter`; return ``{"ops", "by_op", "result"}``."""
    with OpCounter() as mode:
        result = step()
    return {"ops": mode.ops, "by_op": mode.by_op, "result": result}


def cpu_allocator_peak_bytes(step: Callable[[], object]) -> dict:
    """Run ``step()`` under ``torch.profiler`` with memory events; return ``{"peak_bytes", "result"}``.

    ``peak_bytes``: the peak of the running sum of the CPU allocator's allocation (+) and free (-) events
    during the step, so scratch memory inside kernels (e.g. convolution backward) counts too, unlike
    :class:`PeakTensorBytes`. Memory allocated before the step and freed in it counts negatively, as
    for ``torch.cuda.max_memory_allocated`` taken relative to the start. CPU tensors only.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return {"peak_bytes": peak, "result": result}
