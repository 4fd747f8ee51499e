"""One dual call: ``model(*inputs)`` and its JVP through the model's own forward (:func:`dual_call`).

For the duration of one call every submodule's ``forward`` is patched (:func:`patched_forwards`,
``_patched``, ``_wrap_forward``): the module path is tracked for error messages and the report, and the
recomputed blocks run under non-reentrant ``torch.utils.checkpoint`` (``_checkpointed``: DualTensors cross
the checkpoint boundary as their two plain tensors), in row slices of the batch where the plan split them
(``_row_slices`` / ``_cat_rows``: inputs sliced along dim 0, outputs concatenated). ``save="matmul"`` keeps
the outputs of a block's convolutions and matrix products (selective checkpointing, ``_context_fn``).

Shapes: each input and its tangent the same shape (t, u, t_dot, u_dot: [B]; x, x_dot: [B, *D] for a flow
map); returns ``(out, out_dot)`` of the model's output shape. Every name here is importable from
:mod:`sgflow.autodual` too.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from sgflow.autodual.attention import LazyDual
from sgflow.autodual.blocks import _inner
from sgflow.autodual.tails import TailRecorder
from sgflow.autodual.tensor import (
    AT_REST,
    DualizeError,
    DualTensor,
    current,
    current_path,
    dual_context,
    make_dual,
    function_hook,
    is_traced,
)

__all__ = ["dual_call", "patched_forwards"]


# Which tensors a call changed in place (the profile's candidates, dual_call's inputs without a tangent).
def _versions(tree) -> list:
    """The tensors in ``tree`` (a DualTensor's primal and tangent, as it holds them now) with their version
    counters: an in-place op bumps the counter, one on a dual tensor swaps in new ones (rules.inplace)."""
    def version(p):
        try:
            return p._version
        except RuntimeError:  # an inference tensor: no counter (and no gradient to protect)
            return None

    return [(p, version(p)) for a in tree_flatten(tree)[0] if not _lazy(a) for p in _parts(a)
            if isinstance(p, torch.Tensor)]


def _changed(before: list, after: list) -> bool:
    return len(before) != len(after) or any(p is not q or v != w for (p, v), (q, w) in zip(before, after))


def _parts(a):
    return (a._primal, a._tangent) if isinstance(a, DualTensor) else (a,)


def _lazy(a) -> bool:
    """A lazy dual node not computed yet (a GroupNorm's output waiting for its SiLU and conv, attention
    scores waiting for their softmax): reading its primal or tangent would compute it, unfused."""
    return isinstance(a, LazyDual) and a._cache is None


@contextlib.contextmanager
def patched_forwards(wrapping):
    """Replace ``module.forward`` by ``make(module.forward)`` on the instances of ``wrapping`` (pairs
    ``(module, make)``) for the duration of the block, then put back exactly what was there (an
    instance attribute of the user's own, or none)."""
    saved = []
    for mod, make in wrapping:
        saved.append((mod, "forward" in mod.__dict__, mod.__dict__.get("forward")))
        mod.forward = make(mod.forward)
    try:
        yield
    finally:
        for mod, had, prev in saved:
            if had:
                mod.forward = prev
            else:
                del mod.forward


@contextlib.contextmanager
def _patched(model: nn.Module, blocks: Sequence[str], splits: dict | None = None, keep=()):
    """Route every submodule's forward through a wrapper that tracks the module path (for error
    messages and the report) and runs the chosen blocks under non-reentrant checkpointing (in row
    slices where ``splits`` has a :class:`~sgflow.autodual.plan.RowSplit` for them; the blocks in ``keep``
    keeping their dual attention's outputs for the recomputation, :class:`_AttentionKeeper`).

    Patches live on the instances only for the duration of one dual forward: a model copied later
    (EMA, deepcopy) never sees them, and the recomputation in backward calls the original forwards.
    """
    inner = _inner(model) if isinstance(model, nn.Module) else None
    block_set = set(blocks)
    modules = inner.named_modules() if inner is not None else ()
    splits = splits or {}
    keep = frozenset(keep or ())
    with patched_forwards((mod, functools.partial(_wrap_forward, path=path or "<model>", is_block=path in block_set,
                                                  split=splits.get(path), keep=path in keep))
                          for path, mod in modules):
        yield


def _wrap_forward(orig, path: str, is_block: bool, split=None, keep: bool = False):
    @functools.wraps(orig)
    def forward(*args, **kwargs):
        ctx = current()
        if ctx is AT_REST:
            # A thread the model starts itself (nn.DataParallel's replicas): a context of its own there.
            with dual_context():
                return forward(*args, **kwargs)
        ctx.stack.append(path)
        try:
            # A chosen block is checkpointed whether or not its inputs carry a tangent: one called with plain
            # inputs (an embedding of u, whose tangent is zero) runs a plain forward, which saves as much as
            # flow matching's there.
            if is_block and not ctx.in_block and torch.is_grad_enabled():
                ctx.in_block = True
                try:
                    slices = _row_slices(split, args, kwargs) if split is not None else None
                    if slices is None:
                        return _checkpointed(orig, args, kwargs, keep)
                    return _cat_rows([_checkpointed(orig, a, k, keep) for a, k in slices], path)
                finally:
                    ctx.in_block = False
            return orig(*args, **kwargs)
        finally:
            ctx.stack.pop()

    return forward


# Whether recomputed blocks skip their dead tails (sgflow.autodual.tails); read at each block call (the
# benchmarks' A/B).
SKIP_DEAD_TAILS = True


def _checkpointed(orig, args, kwargs, keep: bool = False):
    """``orig(*args, **kwargs)`` under non-reentrant checkpointing, every DualTensor crossing the checkpoint
    boundary as its two plain tensors (primal, tangent), in and out; with ``keep``, the outputs of its dual
    attention are kept for the recomputation instead of computed again (:class:`_AttentionKeeper`; traced:
    a selective-checkpoint policy saving them), unless ``dualize(save=...)`` set a policy of its own.
    Checkpoint keeps its inputs as saved tensors: under a saved-tensor hook of the caller's (a memory
    meter, offloading) a DualTensor came back from it as a plain tensor, so the block was recomputed
    without its tangent (a checkpoint error at best)."""
    from torch.utils._pytree import tree_unflatten

    flat, spec = tree_flatten((args, kwargs))
    plain, layout = _to_plain(flat)
    out_layout = []
    traced = any(is_traced(p) for p in plain) or (not plain and current().traced)
    keeper = _AttentionKeeper() if keep and not traced and current().context_fn is None else None
    # Not traced (the partitioner drops dead ops itself) nor under a selective-checkpoint policy (its cache
    # replays ops by call order): sgflow.autodual.tails.
    tails = TailRecorder() if SKIP_DEAD_TAILS and not traced and current().context_fn is None else None

    def run(*tensors):
        leaves = _from_plain(tensors, layout)
        a, k = tree_unflatten(leaves, spec)
        duals = [(d, d._primal) for d in leaves if isinstance(d, DualTensor)]
        with keeper.running() if keeper is not None else contextlib.nullcontext(), \
                tails.running() if tails is not None else contextlib.nullcontext():
            oflat, ospec = tree_flatten(orig(*a, **k))
        if any(d._primal is not p for d, p in duals):
            # An in-place op on a dual input swaps new values into the block's own DualTensor (rules.inplace):
            # the caller's, outside the checkpoint, would keep the old ones, unlike the same block run whole.
            raise DualizeError(f"dualize: block {current_path()!r} changes a dual input in place and cannot be "
                               f"recomputed; leave it out of `blocks` (blocks='auto' never chooses it) or write "
                               f"the op out of place")
        result, olayout = _to_plain(oflat)
        out_layout[:] = [(olayout, ospec)]
        return tuple(result)

    # Traced: the block's inputs are traced tensors, or it has none (it reads only parameters, which the
    # traced forward replaced by traced ones) and the whole dual forward is traced.
    if traced:
        res = _traced_checkpoint(run, plain, keep)
    else:
        ctx_fn = current().context_fn
        extra = {} if ctx_fn is None else {"context_fn": ctx_fn}
        res = checkpoint(_hooked(run), *plain, use_reentrant=False, preserve_rng_state=True, **extra)
    olayout, ospec = out_layout[0]
    return tree_unflatten(_from_plain(res, olayout), ospec)


try:  # torch.compile's own counter of checkpointed regions: ours and the user's never share an id
    from torch._higher_order_ops.wrap import uid as _AC_GRAPH_IDS
except ImportError:  # pragma: no cover - another torch layout
    import itertools

    _AC_GRAPH_IDS = itertools.count(10**6)


def _prefer_recompute(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.PREFER_RECOMPUTE


_KEEPER = threading.local()  # .keeper: the _AttentionKeeper of the block running on this thread, if any


class _AttentionKeeper:
    """The outputs ``(o, o_dot, lse, mu)`` of a recomputed block's dual attention calls: its forward records
    them, one list per call in call order, and its recomputation in backward hands them back (the ``kept``
    of :func:`sgflow.ops.attention.attention_dual`), which then builds the autograd node from the recomputed
    q, k, v without running the attention's 6 products again. What the plan's ``keep_attention`` counts:
    2 activations of the block's width held per attention, its forward's FLOPs not spent again. Held by the
    checkpoint's recomputation closure: freed with the block's graph."""

    def __init__(self):
        self.calls: list[list] = []
        self.next = 0

    @contextlib.contextmanager
    def running(self):
        prev = getattr(_KEEPER, "keeper", None)
        _KEEPER.keeper, self.next = self, 0
        try:
            yield
        finally:
            _KEEPER.keeper = prev

    def slot(self) -> list:
        if self.next == len(self.calls):
            self.calls.append([])
        self.next += 1
        return self.calls[self.next - 1]


def kept_attention():
    """The ``kept`` list for the next dual attention call of the block running on this thread (empty on
    its forward, the recorded outputs on its recomputation); None where no block keeps them."""
    keeper = getattr(_KEEPER, "keeper", None)
    return None if keeper is None else keeper.slot()


def _keep_attention_policy():
    """A selective-checkpoint policy keeping the dual attention's outputs (:func:`sgflow.ops.attention.forward_ops`)
    and recomputing every other op: a traced block's :class:`_AttentionKeeper` (the partitioner recomputes
    the rest of the block from its graph, not by running its Python again)."""
    from torch.utils.checkpoint import CheckpointPolicy

    from sgflow.ops.attention import forward_ops

    ops = forward_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _traced_checkpoint(run, plain, keep: bool = False):
    """A block of a traced dual forward (sgflow.autodual.traced): checkpointed the way torch.compile
    checkpoints (its ``tag_activation_checkpoint``): AOTAutograd traces through selective checkpointing with
    a policy that prefers recomputing every op, which tags the block's nodes so that the partitioner
    recomputes them in backward instead of keeping them (the RNG replayed by inductor's own functionalized
    random ops, hence ``preserve_rng_state=False``)."""
    import torch.fx.traceback as fx_traceback
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    # dualize(save="matmul") keeps the matrix products' outputs here too, a block the plan keeps attention
    # outputs of keeps those; otherwise every op prefers recomputing.
    policy = _save_matmul_policy if current().context_fn is not None else \
        _keep_attention_policy() if keep else _prefer_recompute

    def ctx_fn():
        fwd_ctx, recompute_ctx = create_selective_checkpoint_contexts(policy)
        fwd_ctx.ac_graph_id = next(_AC_GRAPH_IDS)  # the partitioner orders and separates regions by it
        return fwd_ctx, recompute_ctx

    with fx_traceback.preserve_node_meta():
        return checkpoint(_hooked(run), *plain, use_reentrant=False, preserve_rng_state=False, context_fn=ctx_fn)


def _to_plain(flat):
    """Leaves -> (plain tensors, layout): a DualTensor becomes (primal, tangent); non-tensors stay in the
    layout as constants."""
    plain, layout = [], []
    for a in flat:
        if isinstance(a, DualTensor):
            plain += [a._primal, a._tangent]
            layout.append("dual")
        elif isinstance(a, torch.Tensor):
            plain.append(a)
            layout.append("tensor")
        else:
            layout.append(("const", a))
    return plain, tuple(layout)


def _from_plain(tensors, layout):
    it = iter(tensors)
    leaves = []
    for kind in layout:
        if kind == "dual":
            p = next(it)
            leaves.append(make_dual(p, next(it)))
        elif kind == "tensor":
            leaves.append(next(it))
        else:
            leaves.append(kind[1])
    return leaves


def _row_slices(split, args, kwargs):
    """``split.chunks`` pairs (args, kwargs) (an iterator: a shared input's slice is made as its slice runs),
    the inputs ``split`` names sliced along dim 0; None where
    this call does not fit the layout the profile saw (then the block runs whole, as recomputed blocks
    always may)."""
    named = [args[i] for i in split.args if i < len(args)] + [kwargs[k] for k in split.kwargs if k in kwargs]
    if not named or not all(isinstance(a, torch.Tensor) and a.dim() >= 1 for a in named):
        return None
    n = named[0].shape[0]
    if n < split.chunks or any(a.shape[0] != n for a in named):
        return None
    bounds = [n * j // split.chunks for j in range(split.chunks + 1)]
    # An input read only here: one split (one backward node gathering the slices' gradients once); narrows
    # made before the slices ran backward after every slice's too (autograd runs the nodes made later
    # first) and padded each slice's gradient to the input's size. An input read again after the block
    # (``split.shared``: an embedding every later block reads) has its gradient accumulating already when
    # this block's backward runs: a narrow per slice, made just before that slice, adds the slice's
    # gradient into it right after the slice's backward, instead of holding every slice's to the end.
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]

    def slicer(key, a):  # slice j of input ``key`` (a position or a name)
        if key in split.shared:
            return lambda j: a.narrow(0, bounds[j], sizes[j])
        return a.split(sizes).__getitem__

    by_pos = {i: slicer(i, args[i]) for i in split.args if i < len(args)}
    by_name = {k: slicer(k, kwargs[k]) for k in split.kwargs if k in kwargs}
    return (([by_pos[i](j) if i in by_pos else a for i, a in enumerate(args)],
             {k: by_name[k](j) if k in by_name else a for k, a in kwargs.items()})
            for j in range(split.chunks))


def _cat_rows(outs, path: str):
    """The row slices' outputs (same structure, tensors or None) concatenated along dim 0."""
    from torch.utils._pytree import tree_unflatten

    flat = [tree_flatten(o) for o in outs]
    spec = flat[0][1]
    if any(f[1] != spec for f in flat):
        raise DualizeError(f"dualize: block {path!r} returned differently structured outputs for two row slices; "
                           f"pass split_rows=False to dualize")
    leaves = []
    for parts in zip(*(f[0] for f in flat)):
        if all(p is None for p in parts):
            leaves.append(None)
        elif all(isinstance(p, torch.Tensor) and p.dim() >= 1 for p in parts):
            leaves.append(torch.cat(list(parts)))
        else:
            raise DualizeError(f"dualize: block {path!r}, run in row slices, returned an output that is not rows "
                               f"of a tensor; pass split_rows=False to dualize")
    return tree_unflatten(leaves, spec)


# ATen ops whose outputs a block keeps with save="matmul" (recomputing them costs FLOPs; the
# elementwise rest of the block is recomputed from them in backward).
_MATMUL_OPS = None


def _matmul_ops():
    global _MATMUL_OPS
    if _MATMUL_OPS is None:
        a = torch.ops.aten
        _MATMUL_OPS = {a.convolution.default, a.mm.default, a.addmm.default, a.bmm.default, a.baddbmm.default,
                       a._scaled_dot_product_flash_attention_for_cpu.default}
    return _MATMUL_OPS


def _save_matmul_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _matmul_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _context_fn(save):
    if save is None or save == "none":
        return None
    if save == "matmul":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        return functools.partial(create_selective_checkpoint_contexts, _save_matmul_policy)
    raise ValueError(f"dualize: save must be None or 'matmul', got {save!r}")


def _hooked(fn):
    """``fn`` with custom autograd Functions routed to the dual dispatch: in forward the dual call has
    the hook on already; this keeps it on for the block's recomputation in backward."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with function_hook():
            return fn(*args, **kwargs)

    return run


def _zero_tangent(t: torch.Tensor | None) -> bool:
    """Whether an input's tangent is known to be zero (the input is then passed as a plain tensor).
    Compiled or traced, a zero-valued tangent is carried instead: its values are unknown there (testing them
    would be a graph break, or a data-dependent error in AOTAutograd's trace)."""
    if t is None:
        return True
    if t.requires_grad or torch.compiler.is_compiling() or is_traced(t):
        return False
    return not bool(t.any())


def _check_tangents(inputs, tangents) -> None:
    """Each tangent: None, or a floating tensor of its input's shape on its input's device (another
    floating dtype is cast to the input's). Inputs that are not tensors are left to the forward's checks."""
    if len(inputs) != len(tangents):
        raise ValueError(f"dualize: {len(tangents)} tangents for {len(inputs)} inputs")
    names = ("t", "u", "x") if len(inputs) == 3 else tuple(f"input {i}" for i in range(len(inputs)))
    for name, x, t in zip(names, inputs, tangents):
        if t is None or not isinstance(x, torch.Tensor):
            continue
        dot = f"{name}_dot" if len(name) == 1 else f"the tangent of {name}"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dualize: {dot} must be a tensor of {name}'s shape {tuple(x.shape)} or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"dualize: {dot} must be a floating-point tensor, got dtype {t.dtype}")
        if t.shape != x.shape:
            raise ValueError(f"dualize: {dot} must have {name}'s shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"dualize: {dot} is on {t.device} but {name} is on {x.device}")


def dual_call(model: nn.Module, inputs: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor | None],
              blocks: Sequence[str] = (), report: dict | None = None, save=None, splits: dict | None = None,
              keep=()):
    """``model(*inputs)`` and its JVP along ``tangents`` through the model's own forward.

    Inputs with a zero (or None) tangent are passed as plain tensors. Returns ``(out, out_dot)``;
    ``out_dot`` is zeros when the output does not depend on the dual inputs.
    """
    _check_tangents(inputs, tangents)
    args = [x if _zero_tangent(t) else make_dual(x, t.to(x.dtype)) for x, t in zip(inputs, tangents)]
    for a in args:
        if isinstance(a, DualTensor):
            a._sgflow_model_input = True  # the caller's tensors: an in-place op on them is refused (rules.inplace)
    plain = [] if torch.compiler.is_compiling() else \
        [x for x in args if isinstance(x, torch.Tensor) and not isinstance(x, DualTensor) and not is_traced(x)]
    versions = _versions(plain)
    traced = any(is_traced(x) for x in inputs if isinstance(x, torch.Tensor))
    with dual_context(report=report, context_fn=_context_fn(save), traced=traced), _patched(model, blocks, splits, keep), \
            function_hook():
        out = model(*args)
    if _changed(versions, _versions(plain)):
        # sgflow calls the model more than once on the same inputs (the stop-gradient velocity, the plan's
        # profile): an input changed in place gives each call different values. A dual input's in-place op
        # is refused by its rule; a plain one (u, whose tangent is zero) is seen here.
        raise DualizeError("dualize: the model changed one of its inputs without a tangent in place; sgflow calls "
                           "it more than once on the same inputs. Write the op out of place (`u = u * 2`)")
    if isinstance(out, DualTensor):
        return out._primal, out._tangent
    if isinstance(out, torch.Tensor):
        return out, torch.zeros_like(out)
    raise DualizeError(f"dualize: the model must return one tensor, got {type(out).__name__}")
