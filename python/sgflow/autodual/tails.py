r"""Dead tails of a recomputed block: the convolutions and linear layers whose outputs its recomputation does
not need, skipped there.

A recomputed block (``torch.utils.checkpoint``, non-reentrant) runs its forward again in backward to get back
the tensors its ops saved. An op whose output no later op of the block saves, directly or through ops that
save nothing, is needed for the block's output only, which the recomputation throws away: a U-Net block's
last convolution and skip convolution, ``(conv1(h) + skip(x)) * scale``, about half of the block's FLOPs.
Recomputed, such an op needs its saved tensors (its inputs), not its output.

How: during the block's forward (:meth:`TailRecorder.running`, the first run) every dual op on a DualTensor
goes through :func:`record`:

- a *tail op* (a dual convolution or linear layer, the fused stage ops ending in one: the rules call them
  through :func:`tail_op`) run directly by the block's code (not inside another op's rule) labels its
  outputs with its slot, its call index in the block;
- an op in :data:`PASS` (sums, differences, views, concatenation, casts, products with a Python number:
  autograd saves none of their tensor inputs) hands the labels of its inputs on to its outputs;
- any other op reading a labelled input (saving it, or taking a value from it: a comparison, ``detach``)
  makes those slots *live*. A shape or dtype query (a ``meta`` op) reads no value.

In the recomputation (the second run), a tail op whose slot never became live runs with
:func:`sgflow.ops.recompute.outputs_unused`: its autograd Function saves what it saved in forward and
returns empty outputs of the recorded shapes instead of computing them. Whatever reads them later in the
block saves nothing (that is what made the slot dead), and the block's outputs are discarded.

What the recomputation's empty outputs can reach: only what the labels cannot see, i.e. Python code keeping a
reference without an op (a forward hook storing a tail's output: after backward it holds the recomputation's
empty tensor; a hook that reads the value makes the tail live).

Not used where the recomputation does not run the block's Python (a traced forward: the partitioner drops
dead ops itself) or replays ops from a selective-checkpoint cache (``dualize(save=...)``: skipped ops would
shift its call order).
"""
from __future__ import annotations

import contextlib

import torch

from sgflow.autodual import tensor as _tensor
from sgflow.autodual.tensor import DualTensor

__all__ = ["TailRecorder", "tail_op", "record", "PASS"]

_T = torch.Tensor

# Ops that save none of their tensor inputs for backward (autograd keeps at most sizes, dtypes or a
# Python number), so a label passes through them: what they compute from a tail's output is as dead as it is.
PASS = {
    torch.add, _T.add, _T.__add__, _T.__radd__, torch.sub, _T.sub, _T.__sub__, _T.__rsub__, torch.neg, _T.neg,
    _T.__neg__, _T.view, _T.reshape, torch.reshape, _T.permute, torch.permute, _T.transpose, torch.transpose,
    _T.flatten, torch.flatten, _T.unflatten, _T.squeeze, torch.squeeze, _T.unsqueeze, torch.unsqueeze,
    _T.contiguous, _T.clone, torch.clone, _T.chunk, torch.chunk, _T.split, torch.split, _T.unbind, torch.unbind,
    _T.__getitem__, _T.narrow, torch.narrow, _T.select, torch.select, _T.expand, _T.expand_as, _T.view_as,
    _T.reshape_as, torch.cat, torch.concat, torch.stack, _T.to, _T.float, _T.double, _T.half, _T.bfloat16,
    _T.type_as, _T.sum, torch.sum, _T.mean, torch.mean,
}
# Products and quotients that pass a label when the other operand is a Python number (a tensor operand is
# saved for the gradient of the other).
SCALAR_PASS = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__, torch.div, _T.div, _T.__truediv__, torch.true_divide,
               _T.true_divide}


class TailRecorder:
    """The tail ops of one checkpointed block call: their slots, which became live, their outputs' shapes.

    ``running()`` wraps each run of the block's forward: the first records (:func:`record`, :func:`tail_op`),
    the later ones (the recomputation) skip the dead slots. Recorders never nest: a block inside a recomputed
    block is not checkpointed again (``call._wrap_forward``), and the outputs a block returns are new
    DualTensors without labels (``call._from_plain``)."""

    def __init__(self):
        self.recording = True
        self.next = 0
        self.meta: list = []  # per slot: ((shape, dtype, device), ...) of its tensor outputs
        self.live: set = set()
        self.frames: list = []  # per dispatch in progress: the slots its rule ran

    @contextlib.contextmanager
    def running(self):
        prev = getattr(_tensor._TAILS, "rec", None)
        _tensor._TAILS.rec, self.next = self, 0
        try:
            yield
        finally:
            _tensor._TAILS.rec = prev
            self.recording = False
            self.frames.clear()


def tail_op(run):
    """``run()`` (one call of a tail op's autograd Function: a tuple of tensors) in a checkpointed block: its
    outputs labelled (the block's forward), or replaced by empty tensors where its slot is dead (the
    recomputation); outside one, ``run()``."""
    rec = getattr(_tensor._TAILS, "rec", None)
    if rec is None:
        return run()
    slot, rec.next = rec.next, rec.next + 1
    if rec.recording:
        out = run()
        rec.meta.append(tuple((o.shape, o.dtype, o.device) for o in out if isinstance(o, torch.Tensor)))
        if len(rec.frames) == 1:  # run by the block's code: its outputs are labelled when the dispatch returns
            rec.frames[-1].add(slot)
        else:  # inside another op's rule (a lazy node computed for it): read by that op
            rec.live.add(slot)
        return out
    if slot in rec.live or slot >= len(rec.meta):
        return run()
    from sgflow.ops.recompute import outputs_unused

    with outputs_unused(rec.meta[slot]):
        return run()


def _labels(a, acc: set) -> None:
    t = type(a)
    if t is tuple or t is list:
        for x in a:
            _labels(x, acc)
    elif t is dict:
        for x in a.values():
            _labels(x, acc)
    elif isinstance(a, DualTensor):
        lab = a.__dict__.get("_tail")
        if lab:
            acc |= lab


def _label(out, labels: frozenset) -> None:
    t = type(out)
    if t is tuple or t is list:
        for x in out:
            _label(x, labels)
    elif isinstance(out, DualTensor):
        out.__dict__["_tail"] = labels | out.__dict__.get("_tail", frozenset())


def _passes(func, args, kwargs) -> bool:
    if kwargs.get("out") is not None or kwargs.get("inplace"):
        return False
    if func in PASS:
        return True
    if func in SCALAR_PASS and len(args) == 2 and not kwargs:
        # The tensor comes first: reflected ops (``2.0 * x``) reach __torch_function__ as ``x.__rmul__(2.0)``.
        other = args[1]
        return isinstance(other, (int, float)) and not isinstance(other, bool)
    return False


def record(rec: TailRecorder, rule, kind: str, func, args, kwargs):
    """One dispatched op of a recording block's forward: :func:`tail_op`'s slots run by its rule label its
    outputs; labels of its inputs pass on (:data:`PASS`) or become live (module doc)."""
    rec.frames.append(set())
    try:
        out = rule(func, args, kwargs)
    finally:
        ran = rec.frames.pop()
    if kind == "meta":
        return out
    labels: set = set()
    _labels(args, labels)
    if kwargs:
        _labels(kwargs, labels)
    if labels and not _passes(func, args, kwargs):
        rec.live |= labels
        labels = set()
    if rec.frames:  # a nested dispatch: what it made is read by the enclosing op, whose inputs it are not
        rec.live |= ran | labels
        return out
    labels |= ran
    if labels:
        _label(out, frozenset(labels))
    return out
