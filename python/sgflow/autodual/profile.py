r"""The profile behind ``dualize(model, blocks="auto")``: one plain and one dual forward of the model on the
real inputs, with every candidate block's saved bytes, inputs, FLOPs and backward measured, turned into the
:class:`~sgflow.autodual.plan.Timeline` and :class:`~sgflow.autodual.plan.BlockCost` list that
:func:`sgflow.autodual.plan.choose_blocks` chooses from (what is measured and how it is estimated:
:mod:`sgflow.autodual.plan`).

The profile runs each candidate with its outputs detached (one candidate's graph alive at a time, so
the profile's memory stays near one block's), except lazy dual nodes not computed yet (a GroupNorm's
output waiting for its SiLU and conv, which the forward fuses), which it passes on as they are; right
after a candidate's forward it runs that graph's backward (to its inputs and parameters, ``.grad`` left
alone) under :class:`sgflow.memory.PeakTensorBytes`. It runs on the inner module (no
``DistributedDataParallel`` forward), with the RNG state and buffers (batch-norm statistics) restored
afterwards.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

# Module attributes read at call time (tests and users may set them on sgflow.autodual.plan).
from sgflow.autodual import plan as _plan
from sgflow.autodual.call import _changed, _lazy, _parts, _versions
from sgflow.autodual.attention import frozen
from sgflow.autodual.plan import BlockCost, BlockPlan, Call, RowSplit, Timeline, choose_blocks
from sgflow.autodual.tensor import DualTensor, make_dual
from sgflow.ops.attention import _fwd_flops as _dual_attention_forward_flops, forward_ops

__all__ = ["profile_blocks"]


def _dual_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """A plain SDPA call's FLOPs, weighted for its dual: half the dual attention forward's (6 matrix products
    against 2, where a matmul's dual is 2 against 1; the profile doubles every count)."""
    return _dual_attention_forward_flops(query_shape, key_shape, value_shape) // 2


def _flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts SDPA on CPU (PyTorch's counter has no formula for the CPU
    kernel: attention blocks looked free to recompute), every SDPA kernel weighted for its dual."""
    a = torch.ops.aten
    kernels = [getattr(a, n) for n in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                                      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
               if hasattr(a, n)]
    return FlopCounterMode(display=False, custom_mapping={k: _dual_attention_flops for k in kernels})


class _Saved:
    """saved_tensors_hooks that record each saved storage (parameters excluded) with the innermost
    candidate block being profiled (``""`` outside every candidate), in forward order: ``events`` of
    ``(time, storage id, owner)``, ``sizes`` per storage id. The candidates' calls are recorded as
    windows of that clock (:meth:`tick`). A storage id is one storage for its lifetime (an address freed
    and reused is a new id)."""

    def __init__(self, params: set):
        self.params = params
        self.param_uses: dict = {}  # parameter storage address -> (last time saved, bytes)
        self.stack: list[str] = []
        self.ids: dict = {}  # storage address -> (weak ref, id)
        self.refs: dict = {}  # id -> weak ref
        self.sizes: dict[int, int] = {}
        self.events: list[tuple[int, int, str]] = []
        self.windows: dict[str, list] = {}  # path -> [(start, end, input storage ids, backward scratch)]
        self.clock = 0
        self.checking = False  # a row check or a measured backward runs (no part of the forward)
        self.row_ids: dict = {}  # path -> {sliced position or name: its storage ids}, from the first call
        self.scratch_flops = 0  # FLOPs of the candidates' measured backwards so far (plain pass)

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def storage_id(self, st) -> int | None:
        ref = StorageWeakRef(st)
        if st.data_ptr() == 0 or ref.cdata in self.params:
            return None
        known = self.ids.get(ref.cdata)
        if known is not None and not known[0].expired():
            return known[1]
        uid = len(self.sizes)
        self.ids[ref.cdata] = (ref, uid)
        self.refs[uid] = ref
        self.sizes[uid] = st.nbytes()
        return uid

    def pack(self, t: torch.Tensor):
        if self.checking:  # a row check or a measured backward (recomputing ops keep tensors too): not the forward
            return t
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return t
        uid = self.storage_id(st)
        if uid is not None:
            self.events.append((self.tick(), uid, self.stack[-1] if self.stack else ""))
        elif StorageWeakRef(st).cdata in self.params:
            self.param_uses[StorageWeakRef(st).cdata] = (self.tick(), st.nbytes())
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def input_ids(self, args) -> tuple:
        """The storage ids of the tensors in ``args`` (a DualTensor's primal and tangent), each once."""
        out = []
        for a in tree_flatten(args)[0]:
            if _lazy(a):  # nothing computed yet: no storage of its own
                continue
            for p in (a._primal, a._tangent) if isinstance(a, DualTensor) else (a,) if isinstance(a, torch.Tensor) else ():
                try:
                    uid = self.storage_id(p.untyped_storage())
                except (NotImplementedError, RuntimeError):
                    continue
                if uid is not None and uid not in out:
                    out.append(uid)
        return tuple(out)

    def unique_bytes(self, uids) -> int:
        return sum(self.sizes[u] for u in set(uids))

    def in_windows(self, windows) -> set:
        """The storage ids saved within any of ``windows`` (``(start, end, ...)``)."""
        times = [e[0] for e in self.events]  # increasing
        out: set = set()
        for start, end, *_ in windows:
            out.update(e[1] for e in self.events[bisect.bisect_right(times, start):bisect.bisect_left(times, end)])
        return out

    def owned(self, owner: str) -> int:
        return self.unique_bytes(e[1] for e in self.events if e[2] == owner)


class _Uses(TorchDispatchMode):
    """Every op of the profiled dual forward, as a dispatch mode on ``saved``'s clock: when each storage
    is made and when it is last read by an op while requiring grad. Its gradient is live in backward from
    that last reader's backward to its maker's (the skips of a U-Net, an embedding every block reads),
    whatever is recomputed: :meth:`grads_across` gives those bytes per call. A ``cat``/``stack`` passes
    its inputs' gradients on as views of its output's, which hold that whole gradient until the earliest
    input's maker has run its backward. It also records each dual attention forward (``attention``: its
    time, innermost candidate, output storage ids and FLOPs), the outputs a recomputed block may keep."""

    sgflow_observer = True  # holds no op outputs (sgflow's fused ops may still write into them in place)

    _PINNING = ("aten.cat.default", "aten.stack.default")

    def __init__(self, saved: _Saved):
        super().__init__()
        self.saved = saved
        self.made: dict[int, int] = {}  # storage id -> time of the op that made it
        self.read: dict[int, int] = {}  # storage id -> last time an op read it (requiring grad)
        self.pinned: dict[int, int] = {}  # a cat's output -> when the earliest of its inputs was made
        self.attention: list = []  # (time, owner, output storage ids, FLOPs) per dual attention forward
        self.attention_ops = forward_ops()

    def _ids(self, tensors):
        for a in tensors:
            if isinstance(a, torch.Tensor) and not isinstance(a, DualTensor) and a.layout == torch.strided \
                    and a.device.type != "meta":
                try:
                    uid = self.saved.storage_id(a.untyped_storage())
                except (NotImplementedError, RuntimeError):
                    continue
                if uid is not None:
                    yield a, uid

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.saved.checking:
            return out
        now = self.saved.tick()
        outs = [uid for _, uid in self._ids(tree_flatten(out)[0])]
        for uid in outs:
            self.made.setdefault(uid, now)
        if func in self.attention_ops:
            q, k, v = args[:3]
            self.attention.append((now, self.saved.stack[-1] if self.saved.stack else "", tuple(dict.fromkeys(outs)),
                                   _dual_attention_forward_flops(q.shape, k.shape, v.shape)))
        reads = [uid for a, uid in self._ids(tree_flatten((args, kwargs))[0])
                 if a.requires_grad and a.is_floating_point()]
        if reads and str(func) in self._PINNING and len(outs) == 1:
            self.pinned[outs[0]] = min(self.made.get(u, now) for u in reads)
            return out
        for uid in reads:
            self.read[uid] = now
        return out

    def shared_rows(self, path: str, costs: dict) -> int:
        """Mark the sliced inputs of candidate ``path`` that are read again after its first call
        (``RowSplit.shared``: narrowed per slice, their gradient accumulating from those later reads); return
        the bytes of the others that take a gradient: what its row slices gather (``Call.slice_grads``)."""
        c = costs[path]
        ids = self.saved.row_ids.get(path)
        if c.rows is None or ids is None:
            return 0
        end = self.saved.windows[path][0][1]
        shared = tuple(key for key, uids in ids.items() if any(self.read.get(u, -1) > end for u in uids))
        c.rows = dataclasses.replace(c.rows, shared=shared)
        gathered = {u for key, uids in ids.items() if key not in shared for u in uids}
        return sum(self.saved.sizes[u] for u in gathered if u in self.read)

    def grads_across(self, calls) -> list[int]:
        """Per call ``(start, end, ...)``: the bytes of the gradients live in its backward that flow
        around it: of storages made up to its end and read after it (its outputs included)."""
        spans = sorted((self.pinned.get(u, self.made.get(u, 0)), r, self.saved.sizes[u]) for u, r in self.read.items())
        made = [m for m, _, _ in spans]
        return [sum(g for _, r, g in spans[:bisect.bisect_right(made, end)] if r > end) for _start, end, *_ in calls]


def _backward_scratch(saved: _Saved, start: int, end: int, inputs: tuple, args, out, module: nn.Module) -> int:
    """What the backward of a profiled call's own graph (from its outputs to its tensor inputs and
    parameters, without touching ``.grad``) makes beyond the intermediates it frees: the peak of those
    intermediates still held plus what the backward made and holds (its parameters' gradients among it),
    less the intermediates (bytes; -1 where it could not be run). Its graph is spent (its outputs are
    detached next)."""
    from sgflow.memory import PeakTensorBytes

    def tensors(tree):
        return [p for a in tree_flatten(tree)[0] if not _lazy(a) for p in _parts(a)
                if isinstance(p, torch.Tensor) and p.requires_grad]

    outs = [o for o in tensors(out) if o.grad_fn is not None]
    wrt = list({id(t): t for t in tensors(args) + [p for p in module.parameters() if p.requires_grad]}.values())
    if not outs or not wrt:
        return 0
    intermediates = {u for u in saved.in_windows([(start, end)]) if u not in inputs}
    grads = [torch.ones_like(o) for o in outs]
    meter = PeakTensorBytes()
    for u in intermediates:
        ref = saved.refs[u]
        if not ref.expired():
            meter._counted[ref.cdata] = (ref, saved.sizes[u])
            meter.current += saved.sizes[u]
    held = meter.current
    # No part of the forward (restored, not cleared: a backward may run a candidate's forward, which measures
    # its own backward inside this one).
    checking, saved.checking = saved.checking, True
    try:
        with meter:
            torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    except Exception:  # a backward that cannot run alone here: the estimate falls back to a ratio
        return -1
    finally:
        saved.checking = checking
    return max(meter.peak - held, 0)


def _detach(out):
    """The outputs cut from the candidate's graph (freeing it), as fresh tensors that still require
    grad where they did: what follows saves what it would save in training. A copy of a new leaf, not
    the leaf itself: the forward may modify a block's output in place (``h += 1``), which autograd
    allows on an intermediate and refuses on a leaf."""

    def leaf(a):
        return a.detach().requires_grad_().clone() if a.requires_grad else a.detach()

    def one(a):
        if _lazy(a):  # passed on lazy, as the forward does: what follows may fuse it (GroupNorm + SiLU + conv)
            return a
        if isinstance(a, DualTensor):
            return make_dual(leaf(a._primal), leaf(a._tangent))
        return leaf(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    return tree_map(one, out)


def _rng_states(args, kwargs) -> list:
    """The CPU RNG state and that of the CUDA devices of the tensor inputs (to see whether a block draws)."""
    devs = {a.device for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.device.type == "cuda"}
    return [torch.random.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in sorted(devs, key=str)]


def _any_lazy(tree) -> bool:
    return any(_lazy(a) for a in tree_flatten(tree)[0])


def _row_layout(orig, args, kwargs, out):
    """``(RowSplit(1, positions, names), B)`` if the block maps rows to rows, else ``(None, -1)``.

    B is the leading size of the first dual input; every tensor input with that leading size is
    sliced, parameters excluded. The block qualifies when its outputs are tensors (or None) with leading size B and, run
    without a graph on the first half of the sliced inputs, it returns the first half of each output,
    primal and tangent, to rounding (a tolerance of its dtype relative to the output's largest value).
    """
    leaves = tree_flatten((args, kwargs))[0]
    first = next((a for a in leaves if isinstance(a, DualTensor) and a.dim() >= 1), None)
    if first is None or first.shape[0] < 2:
        return None, -1
    B = first.shape[0]

    def rows(a):
        return isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and a.dim() >= 1 and a.shape[0] == B

    outs = tree_flatten(out)[0]
    if not outs or not all(o is None or rows(o) for o in outs):
        return None, -1
    layout = RowSplit(1, tuple(i for i, a in enumerate(args) if rows(a)), tuple(k for k, a in kwargs.items() if rows(a)))
    half = B // 2
    # Lazy inputs on nodes of their own: slicing one computes it, and the forward, which does not slice it,
    # keeps it lazy (an MLP's SiLU read by every block's linear layer, fused there; computed here, the
    # profile saw later blocks save the activation instead of its input).
    args, kwargs = frozen((args, kwargs))
    try:
        with torch.no_grad():
            sub = orig(*[a.narrow(0, 0, half) if i in layout.args else a for i, a in enumerate(args)],
                       **{k: a.narrow(0, 0, half) if k in layout.kwargs else a for k, a in kwargs.items()})
    except Exception:  # a block that cannot run on part of the batch is not split
        return None, -1
    subs = tree_flatten(sub)[0]
    if len(subs) != len(outs):
        return None, -1
    for o, q in zip(outs, subs):
        if o is None or q is None:
            if o is not q:
                return None, -1
            continue
        if isinstance(o, DualTensor) != isinstance(q, DualTensor) or q.shape[0] != half:
            return None, -1
        for full, part in zip(_parts(o), _parts(q)):
            full = full.detach().narrow(0, 0, half)
            tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(full.dtype, 1e-2)
            scale = float(full.abs().max()) if full.numel() else 0.0
            if full.shape != part.shape or not torch.allclose(part, full, rtol=tol, atol=tol * max(scale, 1e-30)):
                return None, -1
    return layout, B


@contextlib.contextmanager
def _preserved_state(model: nn.Module, devices):
    """RNG streams and buffers (batch-norm statistics, counters) as they were before the profile."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, old in buffers:
                    b.copy_(old)


@contextlib.contextmanager
def _profiling(model: nn.Module, paths, saved: _Saved, costs: dict, dual: bool, row_check=frozenset()):
    """Patch the candidates' forwards: each runs with its own saved bytes, inputs and FLOPs counted (its
    call recorded as a window of ``saved``'s clock, with its inputs), and returns detached outputs, so only
    one candidate's graph is alive at a time. On the dual pass the candidates in ``row_check`` are also
    checked for mapping rows to rows (each check one more forward of the candidate on half the batch)."""
    from sgflow.autodual import patched_forwards

    mods = dict(model.named_modules())

    checking = []  # non-empty while a candidate's row check runs: nested candidates just run

    def wrap(orig, path):
        @functools.wraps(orig)
        def forward(*args, **kwargs):
            if checking:
                return orig(*args, **kwargs)
            c = costs[path]
            inputs = saved.input_ids((args, kwargs))
            start = saved.tick()
            if dual:
                c.boundary += saved.unique_bytes(inputs)
                rng = _rng_states(args, kwargs)
                versions = _versions((args, kwargs))
            saved.stack.append(path)
            try:
                if dual:
                    out = orig(*args, **kwargs)
                    c.mutates_inputs = c.mutates_inputs or _changed(versions, _versions((args, kwargs)))
                else:
                    # Counted on the plain pass, outside the dual rules' custom ops, whose FLOPs the
                    # counter does not know. A dual forward runs each matmul on primal and tangent: twice
                    # the plain FLOPs. Less the backward the calls inside it ran for their measure
                    # (``_backward_scratch``, under this counter too: 3x an outer block's FLOPs).
                    inner_backward = saved.scratch_flops
                    with _flop_counter() as fc:
                        out = orig(*args, **kwargs)
                    c.flops += 2 * (fc.get_total_flops() - (saved.scratch_flops - inner_backward))
            finally:
                saved.stack.pop()
            end = saved.tick()
            if dual and c.batch == 0 and (path not in row_check or _any_lazy(out)):
                c.rows, c.batch = None, -1  # too small to be worth row slices: not checked
            elif dual and c.batch == 0:  # first call of this candidate: does it map rows to rows?
                drew = any(not torch.equal(a, b) for a, b in zip(rng, _rng_states(args, kwargs)))
                checking.append(path)
                was_checking, saved.checking = saved.checking, True
                try:
                    c.rows, c.batch = (None, -1) if drew else _row_layout(orig, args, kwargs, out)
                finally:
                    checking.pop()
                    saved.checking = was_checking
                if c.rows is not None:
                    saved.row_ids[path] = {**{i: saved.input_ids(args[i]) for i in c.rows.args},
                                           **{k: saved.input_ids(kwargs[k]) for k in c.rows.kwargs}}
            if dual:
                scratch = _backward_scratch(saved, start, end, inputs, (args, kwargs), out, mods[path])
            else:
                with _flop_counter() as fc:
                    scratch = _backward_scratch(saved, start, end, inputs, (args, kwargs), out, mods[path])
                saved.scratch_flops += fc.get_total_flops()
            saved.windows.setdefault(path, []).append((start, end, inputs, scratch))
            return _detach(out)

        return forward

    with patched_forwards((mods[p], functools.partial(wrap, path=p)) for p in paths):
        yield


def _timeline(saved: _Saved, uses: _Uses, paths, params: dict, gathered: dict) -> Timeline:
    """A profiled forward's :class:`Timeline`. In a call's backward, besides what is held: the gradients
    flowing around it, and those of the parameters read after it (made by then, kept to the end of the
    step; its own parameters' are in its measure). ``gathered``: per path, the bytes its row slices
    gather (:meth:`_Uses.shared_rows`)."""
    param_uses = sorted(saved.param_uses.values())
    timeline = Timeline(sizes=saved.sizes, saves=saved.events)
    calls = [(p, w) for p in paths for w in saved.windows.get(p, [])]
    grads = dict(zip([id(w) for _, w in calls], uses.grads_across([w for _, w in calls])))
    pgrads = {id(w): sum(b for t, b in param_uses if t > w[1]) for _, w in calls}
    times = [e[0] for e in saved.events]
    for p in paths:
        timeline.windows[p] = []
        for w in saved.windows.get(p, []):
            start, end, ins, scratch = w
            inner = [v for _, v in calls if start < v[0] and v[1] < end]
            timeline.windows[p].append(Call(
                start, end, ins, saved.unique_bytes(saved.in_windows([(start, end)]) - set(ins)),
                grads[id(w)] + pgrads[id(w)], gathered.get(p, 0),
                # A call's backward runs those of the calls inside it: the largest of their measures.
                max([v[3] for v in inner] + [scratch]) if scratch >= 0 else -1, scratch, params[p],
                _inner_peak(saved, times, w, inner, grads, pgrads)))
    return timeline


def _inner_peak(saved: _Saved, times: list, call, inner: list, grads: dict, pgrads: dict) -> int:
    """The peak of a call's backward over its inner calls, as if nothing inside it were recomputed: in the
    backward of an inner call, what the call saved up to that call's end, the gradients flowing around that
    call inside this one (skips of a U-Net recomputed whole) and its own ops' measure."""
    start, end, ins, _ = call
    seen, held, peak = set(ins), 0, 0
    events = saved.events[bisect.bisect_right(times, start):bisect.bisect_left(times, end)]
    k = 0
    for v in sorted(inner, key=lambda v: v[1]):
        while k < len(events) and events[k][0] <= v[1]:
            uid = events[k][1]
            if uid not in seen:
                seen.add(uid)
                held += saved.sizes[uid]
            k += 1
        around = max(grads[id(v)] - grads[id(call)], 0) + max(pgrads[id(v)] - pgrads[id(call)], 0)
        peak = max(peak, held + around + max(v[3], 0))
    return peak


def profile_blocks(model: nn.Module, inputs, tangents, candidates, run_dual, budget: float = 0.5,
                   split_rows: bool = True) -> BlockPlan:
    """Profile ``candidates`` on one plain and one dual forward and choose the blocks to recompute
    (module doc). ``candidates``: ``{path: parent path or None}`` (module paths of ``model``, a child
    listed after its parent), or a list of paths without nesting. ``run_dual(model, inputs, tangents)``
    runs the dual forward without recomputation; ``model`` is the inner module (not a data-parallel
    wrapper)."""
    if not isinstance(candidates, dict):
        candidates = {p: None for p in candidates}
    params = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    costs = {p: BlockCost(p, parent) for p, parent in candidates.items()}
    devices = sorted({x.device.index for x in inputs if isinstance(x, torch.Tensor) and x.device.type == "cuda"})
    with _preserved_state(model, devices):
        state = torch.random.get_rng_state()
        plain = _Saved(params)
        plain_uses = _Uses(plain)
        with torch.enable_grad(), plain.hooks(), _profiling(model, list(candidates), plain, costs, dual=False), \
                plain_uses:
            out = model(*inputs)
        del out
        for p, c in costs.items():  # each storage once, however many blocks inside it save it
            c.plain = plain.unique_bytes(plain.in_windows(plain.windows.get(p, ())))
        # Row slices of a candidate free about what its plain forward keeps (half its dual intermediates):
        # only those that could free plan.MIN_ROW_SLICE_GAIN are checked.
        row_check = {p for p, c in costs.items() if c.plain >= _plan.MIN_ROW_SLICE_GAIN} if split_rows else set()
        torch.random.set_rng_state(state)  # the same dropout draws as the plain pass
        dual = _Saved(params)
        uses = _Uses(dual)
        with torch.enable_grad(), dual.hooks(), _profiling(model, list(candidates), dual, costs, dual=True,
                                                           row_check=row_check), uses:
            out = run_dual(model, inputs, tangents)
        del out
    for p, c in costs.items():
        c.own = dual.owned(p)
        c.kept = dual.unique_bytes(dual.in_windows(dual.windows.get(p, [])))
        inside = [a for a in uses.attention if any(w[0] < a[0] < w[1] for w in dual.windows.get(p, []))]
        c.attn_out = dual.unique_bytes(u for a in inside for u in a[2])
        c.attn_flops = sum(a[3] for a in inside)
    mods = dict(model.named_modules())
    param_bytes = {p: sum(q.numel() * q.element_size() for q in mods[p].parameters() if q.requires_grad)
                   for p in candidates}
    gathered = {p: uses.shared_rows(p, costs) for p in candidates}
    timeline = _timeline(dual, uses, candidates, param_bytes, gathered)
    timeline.attention = [(time, uid, owner) for time, owner, uids, _ in uses.attention for uid in uids]
    flow = _timeline(plain, plain_uses, candidates, param_bytes, {})
    timeline.plain = flow.plain = plain.unique_bytes(e[1] for e in plain.events)
    timeline.plain_peak = flow.peak(set(), {}, candidates)[1]
    return choose_blocks([costs[p] for p in candidates], dual.owned(""), plain.owned(""), budget, split_rows, timeline)
