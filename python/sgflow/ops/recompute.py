r"""Op-level recomputation: ``outs = fn(*inputs)`` keeping only the inputs for backward.

Shapes: any; ``fn(*inputs) -> tuple of tensors``. ``rows``: the positions of the inputs whose dim 0
``fn`` maps row by row to dim 0 of every output (``inputs[i]: [N, ...]`` -> ``outs[k]: [N, ...]``,
row n of each output depending only on row n of those inputs), e.g. a layer norm's x and x_dot, not its
weight.

Forward
-------
    outs = fn(*inputs)                             (no graph: nothing but the inputs is saved)

Backward
--------
Cotangents ``G_k`` of ``outs[k]``; with the graph of ``fn`` recomputed from the saved inputs,

    d inputs[i] = sum_k (d outs[k] / d inputs[i])^T G_k           (torch.autograd.grad)

When ``rows`` is given, N > 1 and the row inputs are large enough, the recomputation runs on
``S = min(ROW_SLICES, N, numel // ROW_SLICE_MIN_NUMEL)`` slices of rows ``[lo, hi)`` one after the
other: the row inputs' gradients are written to their rows, the others' summed over the slices.
The recomputation is recorded by autograd, so second derivatives (the gradient through a dual
formula's tangent) come from autograd of ``fn``. The autocast state of the forward is restored.

Outputs not needed
------------------
:func:`outputs_unused` / :func:`unused_outputs`: a recomputed block's last convolutions and linear layers
(sgflow.autodual.tails) have their autograd Function save what it saves and return empty outputs of the
given shapes instead of computing them (their recomputation is needed for the saved tensors only).

Module layout (see docs/DESIGN.md): :class:`RecomputeOp`, :func:`recompute_op` (applied by the dual
engine's softmax, log-softmax and normalisation rules, sgflow.autodual.rules), :func:`outputs_unused`; no
kernels.
"""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["RecomputeOp", "recompute_op", "ROW_SLICES", "ROW_SLICE_MIN_NUMEL", "outputs_unused", "unused_outputs"]

_UNUSED = threading.local()  # .meta: the outputs the next dual op on this thread returns without computing them


@contextlib.contextmanager
def outputs_unused(meta):
    """Within: the next dual conv / linear op (``DualConv``, ``DualLinear``, ``PointwiseConvDual``,
    ``PointwiseLinearDual``, ``GNModulateActConvDual``, ``GNSiLUConvDual``) saves its tensors as always but
    returns empty tensors of ``meta`` (``(shape, dtype, device)`` per output) instead of its outputs: a
    recomputed block's op whose outputs nothing saves (sgflow.autodual.tails)."""
    _UNUSED.meta = tuple(meta)
    try:
        yield
    finally:
        _UNUSED.meta = None


def unused_outputs():
    """Empty tensors for the outputs an op under :func:`outputs_unused` does not compute (taken once), else None."""
    meta = getattr(_UNUSED, "meta", None)
    if meta is None:
        return None
    _UNUSED.meta = None
    return tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in meta)


class RecomputeOp(torch.autograd.Function):
    """``fn(*tensors)`` run without a graph; backward recomputes it with one and differentiates.

    Op-level recomputation for the dual formulas of elementwise and normalisation ops: autograd of
    the written-out formula would keep every intermediate (a dozen activation-sized tensors for a
    tanh-GELU tangent or a layer norm); this keeps only the op's inputs, as the primal op does.
    Second derivatives (the gradient through the tangent) come from autograd of the formula.

    ``rows``: the positions of the inputs whose rows (dim 0) ``fn`` maps to the same rows of every
    output, independently of the other rows (a layer norm's input and tangent; not its weight).
    Backward then recomputes and differentiates ``ROW_SLICES`` slices of rows one after the other, so
    the formula's intermediates are live for one slice at a time (they were the peak of a step whose
    blocks are recomputed in row slices); the other inputs' gradients are summed over the slices.
    """

    @staticmethod
    def forward(ctx, fn, rows, *tensors):
        ctx.fn = fn
        dt = next(t for t in tensors if isinstance(t, torch.Tensor)).device.type
        ctx.autocast = (dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))
        ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in tensors])
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in tensors]
        with torch.no_grad():
            outs = fn(*tensors)
        n = tensors[rows[0]].shape[0] if rows else 0
        ok = n > 1 and all(isinstance(o, torch.Tensor) and o.dim() >= 1 and o.shape[0] == n for o in outs)
        ctx.rows = tuple(rows) if ok else ()
        return outs

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[2:]
        if not ctx.rows:
            return (None, None, *_recompute_grads(ctx, saved, need, grads))
        n = saved[ctx.rows[0]].shape[0]
        chunks = max(1, min(ROW_SLICES, n, saved[ctx.rows[0]].numel() // ROW_SLICE_MIN_NUMEL))
        if chunks == 1:
            return (None, None, *_recompute_grads(ctx, saved, need, grads))
        shared = [None if s is None or i in ctx.rows else s.detach().requires_grad_(need[i])
                  for i, s in enumerate(saved)]
        res = [None] * len(saved)
        bounds = [n * j // chunks for j in range(chunks + 1)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = [s.narrow(0, lo, hi - lo) if i in ctx.rows else shared[i] if s is not None else None
                    for i, s in enumerate(saved)]
            got = _recompute_grads(ctx, part, need, [None if g is None else g.narrow(0, lo, hi - lo) for g in grads],
                                   leaves=shared)
            for i, g in enumerate(got):
                if g is None:
                    continue
                if i in ctx.rows:
                    if res[i] is None:
                        res[i] = g.new_zeros(saved[i].shape)
                    res[i][lo:hi] = g
                else:
                    res[i] = g if res[i] is None else res[i] + g
        return (None, None, *res)


# RecomputeOp's backward over row slices: at most this many, of at least this many elements each.
ROW_SLICES = 8
ROW_SLICE_MIN_NUMEL = 2**17


def _recompute_grads(ctx, saved, need, grads, leaves=None):
    """Gradients of ``ctx.fn``'s outputs (cotangents ``grads``) w.r.t. its tensor inputs ``saved``,
    recomputed with a graph; ``leaves``: inputs already made leaves (shared by several row slices)."""
    inputs = [o if s is None else leaves[i] if leaves is not None and leaves[i] is not None
              else s.detach().requires_grad_(need[i])
              for i, (s, o) in enumerate(zip(saved, ctx.others))]
    device_type, on, dtype = ctx.autocast
    with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=on):
        outs = ctx.fn(*inputs)
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
               if pairs and wrt else [None] * len(wrt))
    return [next(got) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs]


def recompute_op(fn, *inputs, rows=()):
    """``fn(*inputs) -> tuple of tensors`` keeping only ``inputs`` for backward (see RecomputeOp;
    ``rows``: positions of the inputs ``fn`` treats row by row)."""
    if not torch.is_grad_enabled() or not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return fn(*inputs)
    return RecomputeOp.apply(fn, tuple(rows), *inputs)
