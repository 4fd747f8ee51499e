r"""Multilinear ops (product rule: mul, matmul, einsum, addcmul; the hand-written attention pattern
``softmax(q k^T) v`` becomes lazy attention nodes), division, and pow / softmax / log_softmax with their
derivatives written out."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sgflow.autodual.rules.common import _T, _bind, _fit, recompute_op
from sgflow.autodual.rules.fallback import forward_ad
from sgflow.autodual.rules.fusions import gn_modulate_node
from sgflow.autodual.rules.structural import nondiff
from sgflow.autodual.tensor import (
    DualTensor,
    call_flat,
    dual_leaves,
    make_dual,
    note_rule,
    primal,
    tangent,
    unwrap_primals,
    wrap_outputs,
)
from sgflow.ops.scale import ScaleDual, scale_fits


# ---------------------------------------------------------------------------------------------
# Multilinear ops: product rule


_MATMULS = {torch.bmm, torch.matmul, _T.bmm, _T.matmul, _T.__matmul__}
_SCALE_OPS = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__}


def _einsum_form(eq: str):
    """'scores' for '<b>id,<b>jd-><b>ij', 'apply' for '<b>ij,<b>jd-><b>id', else None."""
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    ops = ins.split(",")
    if len(ops) != 2 or len(ops[0]) != len(ops[1]) or len(ops[0]) < 3 or len(set(ops[0])) != len(ops[0]):
        return None
    a, b = ops
    batch = a[:-2]
    if b[:-2] != batch or out[:-2] != batch or len(out) != len(a):
        return None
    i, x = a[-2], a[-1]
    if b[-1] == x and b[-2] not in (i, x) and out[-2:] == i + b[-2]:
        return "scores"
    if b[-2] == x and b[-1] not in (i, x) and out[-2:] == i + b[-1]:
        return "apply"
    return None


def _noted(result, kind):
    if result is not None:
        note_rule(kind)
    return result


def _lazy_attention(func, args, kwargs):
    """The hand-written attention pattern (see sgflow.autodual.attention), or None."""
    from sgflow.autodual import attention as la

    if kwargs:
        return None
    if func in _SCALE_OPS and len(args) == 2:
        a, b = args
        if la._is_lazy(a, "scores") and isinstance(b, (int, float)):
            return la.scale_node(a, float(b))
        if la._is_lazy(b, "scores") and isinstance(a, (int, float)):
            return la.scale_node(b, float(a))
        return None
    if func is torch.einsum:
        eq, ops = args[0], list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        form = _einsum_form(eq) if isinstance(eq, str) and len(ops) == 2 else None
        if form == "apply" and la._is_lazy(ops[0], "probs"):
            return _noted(la.probs_matmul(ops[0], ops[1]), "rule:attention (softmax(q k^T) v, fused op)")
        if form == "scores" and all(isinstance(o, torch.Tensor) for o in ops):
            args = la.frozen(args)
            ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
            return la.scores_node(func, args, kwargs, ops[0], ops[1], lambda: product(func, args, kwargs, lazy=False))
        return None
    if func in _MATMULS and len(args) == 2:
        a, b = args
        if la._is_lazy(a, "probs") and isinstance(b, torch.Tensor):
            return _noted(la.probs_matmul(a, b), "rule:attention (softmax(q k^T) v, fused op)")
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and primal(b).dim() >= 3:
            args = la.frozen(args)
            a, b = args
            k = b.mT  # the transposed operand as keys (a linear op on the dual, a view)
            return la.scores_node(func, args, kwargs, a, k, lambda: product(func, args, kwargs, lazy=False))
    return None


def product(func, args, kwargs, lazy=True):
    """``y_dot = sum_i op(x_1, .., x_i_dot, .., x_n)`` for ops linear in each tensor argument."""
    if lazy:
        r = _lazy_attention(func, args, kwargs)
        if r is None and func in _SCALE_OPS and len(args) == 2 and not kwargs:
            # group_norm(x) * m, m per sample and channel: lazy, for a shift, an activation and a conv after it.
            r = gn_modulate_node(None, args[0], args[1], 1,
                                 lambda _s, gn, m: product(func, (gn, m) if args[0] is gn else (m, gn), {}, lazy=False))
        if r is None and func in _SCALE_OPS and len(args) == 2 and not kwargs:
            r = _broadcast_scale(*args)
        if r is not None:
            return r
    flat, spec, idx = dual_leaves(args, kwargs)
    pflat = [primal(a) for a in flat]
    out = call_flat(func, pflat, spec)
    t = None
    for i in idx:
        f = list(pflat)
        f[i] = flat[i]._tangent
        term = call_flat(func, f, spec)
        t = term if t is None else t + term
    return wrap_outputs(out, _fit(t, out.shape))


# Whether ``x * s`` with a per-sample, per-channel factor (an adaLN gate or scale) runs as the fused dual
# product (sgflow.ops.scale.ScaleDual: one C++ pass each way on CPU) rather than the product rule's three
# products and a sum (False: the benchmarks' A/B).
FUSED_SCALE = True


def _broadcast_scale(a, b):
    """``x * s`` for dual ``x`` and a dual factor ``s`` broadcast over the positions of ``x`` (a DiT's
    ``gate[:, None] * h`` and ``norm(x) * (1 + scale[:, None])``, a FiLM ``h * s[:, :, None, None]``):
    :class:`sgflow.ops.scale.ScaleDual`, or None (the product rule)."""
    if not (FUSED_SCALE and isinstance(a, DualTensor) and isinstance(b, DualTensor)):
        return None
    for x, s in ((a, b), (b, a)):
        xp, sp = primal(x), primal(s)
        view = scale_fits(xp.shape, sp.shape)
        if view is None:
            continue
        xt, st = tangent(x), tangent(s)
        if (len({xp.dtype, sp.dtype, xt.dtype, st.dtype}) != 1 or xp.device != sp.device
                or torch.is_autocast_enabled(xp.device.type)):
            return None
        note_rule("rule:mul by a broadcast factor (fused dual product)")
        return make_dual(*ScaleDual.apply(xp, xt, sp, st, view))
    return None


def _addcmul_rule(func, args, kwargs):
    """input + value * t1 * t2: affine in input, bilinear in (t1, t2). A lazy GroupNorm factor with per-sample
    modulation operands (EDM's adaptive norm) stays lazy (``fusions.gn_modulate_node``)."""
    b = _bind(args, kwargs, ("input", "tensor1", "tensor2"), {"value": 1})
    x, t1, t2, value = b["input"], b["tensor1"], b["tensor2"], b["value"]
    if isinstance(value, torch.Tensor):
        return forward_ad(func, args, kwargs)
    node = gn_modulate_node(x, t1, t2, value, lambda x_, a, b_: _addcmul(x_, a, b_, value))
    return node if node is not None else _addcmul(x, t1, t2, value)


def _addcmul(x, t1, t2, value):
    out = torch.addcmul(primal(x), primal(t1), primal(t2), value=value)
    t = tangent(x)
    # value * t1_dot * t2 + value * t1 * t2_dot onto x_dot as addcmuls: one pass each (an adaptive norm's
    # x * (1 + scale) + shift: 6 elementwise ops per call as products and sums).
    for a, other in ((t1, t2), (t2, t1)):
        if isinstance(a, DualTensor):
            if t is None:
                t = a._tangent * primal(other) if value == 1 else torch.mul(a._tangent, primal(other)).mul_(value)
            elif t.shape == out.shape and t is not tangent(x):
                t.addcmul_(a._tangent, primal(other), value=value)
            else:
                t = torch.addcmul(t, a._tangent, primal(other), value=value)
    return wrap_outputs(out, _fit(t, out.shape))


def divide(func, args, kwargs):
    """a / b: y_dot = (a_dot - y b_dot) / b (``__rtruediv__(b, a)`` is a / b with swapped roles)."""
    if kwargs.get("rounding_mode") is not None:
        return nondiff(func, args, kwargs)
    if func is not _T.__rtruediv__ and len(args) == 2 and isinstance(args[1], (int, float)) and not kwargs:
        from sgflow.autodual import attention as la

        if la._is_lazy(args[0], "scores"):
            return la.scale_node(args[0], 1.0 / float(args[1]))
    swapped = func is _T.__rtruediv__
    a, b = (args[1], args[0]) if swapped else (args[0], args[1])
    out = func(*unwrap_primals(args), **unwrap_primals(kwargs))
    pa, pb = primal(a), primal(b)
    t = None
    if isinstance(a, DualTensor):
        t = a._tangent / pb
    if isinstance(b, DualTensor):
        term = -out * b._tangent / pb
        t = term if t is None else t + term
    return wrap_outputs(out, _fit(t, out.shape))


# ---------------------------------------------------------------------------------------------
# Power and softmax: derivatives written out


def _pow_rule(func, args, kwargs):
    base, expo = args[0], args[1] if len(args) > 1 else kwargs.get("exponent")
    if func is _T.__rpow__ or isinstance(expo, DualTensor) or not isinstance(base, DualTensor):
        return forward_ad(func, args, kwargs)
    out = func(*unwrap_primals(args), **unwrap_primals(kwargs))
    x = base._primal
    e = primal(expo)
    return wrap_outputs(out, e * x.pow(e - 1) * base._tangent)


def _softmax_dim(args, kwargs):
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return dim


def _softmax_rule(func, args, kwargs, lazy=True):
    dim = _softmax_dim(args, kwargs)
    if dim is None or not isinstance(args[0], DualTensor):
        return forward_ad(func, args, kwargs)
    from sgflow.autodual import attention as la

    x = args[0]
    if lazy and la._is_lazy(x, "scores") and dim in (-1, len(x._lazy_shape) - 1) and kwargs.get("dtype") is None and (
            func is _T.softmax or len(args) <= 2 or args[2] is None or func is F.softmax and (len(args) < 4 or args[3] is None)):
        # Materialising the probabilities (any use other than `@ v`) evaluates the scores eagerly; from a
        # node of their own (la.frozen), whatever an in-place op does to the user's scores tensor later.
        args = la.frozen(args)
        return la.softmax_node(args[0], lambda: _softmax_rule(func, args, kwargs, lazy=False))
    pa, pk = tuple(args[1:]), dict(kwargs)  # dims and dtypes only: the closure must hold no tensor

    def both(xp, xt):
        y = func(xp, *pa, **pk)
        xd = xt.to(y.dtype)
        return y, y * (xd - (y * xd).sum(dim, keepdim=True))

    return make_dual(*recompute_op(both, args[0]._primal, args[0]._tangent))


def _log_softmax_rule(func, args, kwargs):
    dim = _softmax_dim(args, kwargs)
    if dim is None or not isinstance(args[0], DualTensor):
        return forward_ad(func, args, kwargs)
    pa, pk = tuple(args[1:]), dict(kwargs)  # dims and dtypes only: the closure must hold no tensor

    def both(xp, xt):
        y = func(xp, *pa, **pk)
        xd = xt.to(y.dtype)
        return y, xd - (y.exp() * xd).sum(dim, keepdim=True)

    return make_dual(*recompute_op(both, args[0]._primal, args[0]._tangent))
