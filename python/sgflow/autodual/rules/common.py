r"""Helpers shared by the dual rules: argument binding, tangent/precision queries, ``_fit``, and the
op-level recomputation that the softmax and normalisation rules use (``recompute_op``, ``_RecomputeOp``:
:mod:`sgflow.ops.recompute`, whose ``ROW_SLICES`` and ``ROW_SLICE_MIN_NUMEL`` set its backward's row
slices and are read there)."""
from __future__ import annotations

import contextlib

import torch

from sgflow.autodual.tensor import primal, tangent
from sgflow.ops.recompute import RecomputeOp as _RecomputeOp, _recompute_grads, recompute_op  # noqa: F401


_T = torch.Tensor


_nullctx = contextlib.nullcontext


def _fns(names, *spaces):
    out = []
    for n in names:
        for s in spaces:
            f = getattr(s, n, None)
            if f is not None:
                out.append(f)
    return out


def _getters(names):
    out = []
    for n in names:
        d = getattr(_T, n, None)
        if d is not None and hasattr(d, "__get__"):
            out.append(d.__get__)
    return out


def _bind(args, kwargs, names, defaults):
    """Positional + keyword arguments of a functional call as one dict (defaults filled in)."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _tangent_or_zeros(x):
    t = tangent(x)
    return torch.zeros_like(primal(x)) if t is None else t


def _low_precision(x):
    return x.dtype in (torch.float16, torch.bfloat16)


def _fit(t, shape):
    """A tangent broadcast to the output's shape, materialised (later views need real strides)."""
    if t.shape == shape:
        return t
    return t.expand(shape).contiguous()
