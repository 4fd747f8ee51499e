r"""Hand-written attention ``softmax(s q k^T) v`` routed to the dual attention op, never forming P.

Networks that write attention out (``torch.bmm(q, k.transpose(1, 2)) * s``, ``torch.einsum("nqc,nkc->nqk",
q, k)``, ``(q @ k.mT)``, then ``.softmax(-1)``, then ``@ v`` / ``bmm`` / ``einsum("nqk,nkc->nqc")``) would
otherwise get the N x N scores, probabilities and their tangents as tensors, several of them alive
in backward. Here the three ops are evaluated lazily:

- a batched matmul / two-operand einsum of the score form returns a :class:`LazyDual` *scores*
  node holding (q, k, scale) instead of computing anything;
- multiplying or dividing it by a Python number folds into the scale;
- a softmax over its last dim returns a lazy *probabilities* node;
- a matmul of that node with v calls :func:`sgflow.ops.attention.attention_dual` (O(N) memory per
  row, a Triton kernel on GPU).

Any other use of a lazy node materialises it through the ordinary rules (product rule, softmax
rule), so results never depend on whether the pattern matched. Shapes: q [*, Nq, D], k [*, Nk, D],
v [*, Nk, Dv] with the same leading dims ``*``.
"""
from __future__ import annotations

import torch

from sgflow.autodual.tensor import DualTensor, make_dual, primal, tangent

__all__ = ["LazyDual", "scores_node", "scale_node", "softmax_node", "probs_matmul"]


class LazyDual(DualTensor):
    """A dual tensor whose primal and tangent are computed on first use (``materialize``).

    The object carries only metadata (a storage-less wrapper); every op reaching it goes through
    the dual dispatch, which reads ``_primal`` / ``_tangent`` and so materialises it."""

    @staticmethod
    def __new__(cls, shape, like: torch.Tensor, kind: str, parts: dict, materialize):
        r = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=like.dtype, device=like.device)
        r._kind, r._parts, r._materialize, r._cache = kind, parts, materialize, None
        r._lazy_shape, r._like = tuple(shape), like  # read without dispatch (which would materialise)
        return r

    def __init__(self, *args, **kwargs):  # noqa: D107 - everything is set in __new__
        pass

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Every op on a LazyDual is routed by __torch_function__ to a dual rule, which works on the
        # materialised primal and tangent; an ATen op reaching the wrapper itself is a bug.
        raise RuntimeError(f"sgflow.autodual: ATen op {func} reached a lazy attention node directly")

    def _value(self):
        if self._cache is None:
            out = self._materialize()
            self._cache = (out._primal, out._tangent)
            self._parts = None  # the inputs are no longer needed by this node
        return self._cache

    @property
    def _primal(self):
        return self._value()[0]

    @property
    def _tangent(self):
        return self._value()[1]

    def __repr__(self):
        return f"LazyDual({self._kind}, shape={self._lazy_shape})"


def frozen(tree):
    """``tree`` with each DualTensor replaced by one of its own: a computed one by a new DualTensor holding
    the same primal and tangent, a lazy one not computed yet by a new node of the same computation (computed
    again if both are used). What a lazy node keeps of its inputs: an in-place op on an input later swaps new
    values into the user's tensor object (rules.inplace); the node, computed after it, must still see the
    values it was made from."""
    from torch.utils._pytree import tree_map

    def one(a):
        if isinstance(a, LazyDual) and a._cache is None:
            return LazyDual(a._lazy_shape, a._like, a._kind, a._parts, a._materialize)
        if isinstance(a, DualTensor):
            return make_dual(a._primal, a._tangent)
        return a

    return tree_map(one, tree)


def _is_lazy(x, kind):
    return isinstance(x, LazyDual) and x._cache is None and x._kind == kind


def scores_node(func, args, kwargs, q, k, materialize):
    """Lazy ``q k^T`` for q [*, Nq, D], k [*, Nk, D] (same leading dims), or None if not that shape."""
    qp, kp = primal(q), primal(k)
    if qp.dim() < 3 or qp.shape[:-2] != kp.shape[:-2] or qp.shape[-1] != kp.shape[-1] or qp.dtype != kp.dtype:
        return None
    shape = (*qp.shape[:-1], kp.shape[-2])
    return LazyDual(shape, qp, "scores", {"q": q, "k": k, "scale": 1.0}, materialize)


def scale_node(x, factor: float):
    """A scores node times a Python number."""
    p = x._parts
    mat = x._materialize
    return LazyDual(x._lazy_shape, x._like, "scores", dict(p, scale=p["scale"] * factor), lambda: _scaled(mat(), factor))


def _scaled(d, factor):
    return make_dual(d._primal * factor, d._tangent * factor)


def softmax_node(x, materialize):
    """softmax over the last dim of a scores node."""
    return LazyDual(x._lazy_shape, x._like, "probs", dict(x._parts), materialize)


def probs_matmul(probs, v):
    """``softmax(s q k^T) v`` through the dual attention op; None if v does not fit."""
    p = probs._parts
    q, k, scale = p["q"], p["k"], p["scale"]
    qp, kp, vp = primal(q), primal(k), primal(v)
    if vp.dim() != qp.dim() or vp.shape[:-2] != qp.shape[:-2] or vp.shape[-2] != kp.shape[-2] or vp.dtype != qp.dtype:
        return None
    from sgflow.autodual.call import kept_attention
    from sgflow.ops.attention import attention_dual

    lead = qp.shape[:-2]

    def four(t):
        return t.reshape(-1, 1, *t.shape[-2:])

    def tan(a, ap):
        t = tangent(a)
        return torch.zeros_like(ap) if t is None else t.to(ap.dtype)

    o, od = attention_dual(four(qp), four(kp), four(vp), four(tan(q, qp)), four(tan(k, kp)), four(tan(v, vp)),
                           scale=float(scale), kept=kept_attention())
    return make_dual(o.reshape(*lead, *o.shape[-2:]), od.reshape(*lead, *od.shape[-2:]))
