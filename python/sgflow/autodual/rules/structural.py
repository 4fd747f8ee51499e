r"""Structural rules: metadata queries (``meta``), non-differentiable ops (``nondiff``), in-place ops
(``inplace``: the out-of-place op swapped into the tensor object), the errors for the other in-place ops and
Python control flow, and the ops linear or affine in their tensor data (``linear``,
``affine``: the tangent is the same op on the tangents)."""
from __future__ import annotations

import torch

from sgflow.autodual.rules.common import _T, _fit, _fns, _getters
from sgflow.autodual.tensor import (
    AT_REST,
    DerivedValue,
    DualTensor,
    _TracedDual,
    call_flat,
    current,
    dispatch,
    dual_leaves,
    fail,
    primal,
    unflatten_args,
    unwrap_primals,
    wrap_outputs,
)


# Metadata a lazy node's wrapper holds itself (shape, dtype and device are those of its result).
_LAZY_SAFE_META = frozenset(_getters(["shape", "dtype", "device", "ndim", "is_cuda", "is_cpu", "layout", "itemsize"])
                            + _fns(["size", "dim", "numel", "nelement", "ndimension", "is_floating_point",
                                    "is_complex", "element_size", "get_device", "__len__"], _T))


# Non-differentiable ops whose results are still *values* of the dual tensor (branching on them would
# take a branch by the primal's value): returned as DerivedValue.
_DERIVED_NAMES = {
    "sign", "sgn", "floor", "ceil", "round", "trunc", "fix", "argmax", "argmin", "argsort", "eq", "ne", "lt", "gt",
    "le", "ge", "greater", "less", "greater_equal", "less_equal", "not_equal", "__eq__", "__ne__", "__lt__", "__le__",
    "__gt__", "__ge__", "isnan", "isinf", "isfinite", "isposinf", "isneginf", "isclose", "logical_not", "any", "all",
    "nonzero", "count_nonzero", "signbit", "long", "int", "bool",
}


# ---------------------------------------------------------------------------------------------
# Metadata, errors, non-differentiable ops


def meta(func, args, kwargs):
    """Shape/dtype/device queries: answered by the primal, no tangent. A lazy node answers the ones its
    storage-less wrapper knows itself, without being materialised (a dropout mask drawn from
    ``h.shape``, ``h.device`` must not break the fusion of ``h`` into a following op)."""
    from sgflow.autodual.attention import LazyDual

    if args and isinstance(args[0], LazyDual) and args[0]._cache is None and func in _LAZY_SAFE_META:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    return func(*unwrap_primals(args), **unwrap_primals(kwargs))


def nondiff(func, args, kwargs):
    """Ops whose output carries no tangent (constant in x): computed on the primals. Comparisons and
    other values derived from a dual tensor come back as :class:`DerivedValue` (Python control flow on
    them raises, see there)."""
    out = func(*unwrap_primals(args), **unwrap_primals(kwargs))
    name = getattr(func, "__name__", "")
    if name in _DERIVED_NAMES and isinstance(out, torch.Tensor) and type(out) is torch.Tensor:
        return out.as_subclass(DerivedValue)
    return out


def inplace_error(func, args, kwargs):
    raise fail(
        func,
        "in-place op on a tensor that carries a tangent (the dual forward keeps primal and tangent as two "
        "tensors and cannot update both in place)",
        "Write it out of place (e.g. `x = x + y` instead of `x += y`, `F.silu(x)` instead of `inplace=True`)",
    )


# In-place ops a dual tensor takes (its out-of-place twin computed, then swapped into the tensor object).
_INPLACE_TWINS = {f"__i{n}__": f"__{n}__" for n in ("add", "sub", "mul", "truediv")}
_INPLACE_TWINS.update({f"{n}_": n for n in ("add", "sub", "mul", "div", "neg", "clamp", "clamp_min", "clamp_max",
                                             "relu", "sigmoid", "tanh", "exp", "square", "masked_fill", "addcmul",
                                             "addcdiv", "lerp")})


def _storage_users(t: torch.Tensor) -> int:
    """Tensors sharing ``t``'s storage (``t`` itself included)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1  # less the storage object made here


def _own_users(x) -> int:
    """The tensors of ``x`` itself that share its primal's storage: the primal; the DualTensor object, which
    aliases it (a lazy node holds no data); and where a fused op returned primal and tangent as two halves of
    one buffer (the GroupNorm-SiLU-conv op), the tangent and that buffer. More users: another tensor views it."""
    from sgflow.autodual.attention import LazyDual

    p, t = x._primal, x._tangent
    n = 1 + (0 if isinstance(x, LazyDual) else 1)
    if p._base is not None:
        n += 1
        if t._base is p._base:
            n += 1
    return n


def inplace(func, args, kwargs):
    """An in-place op on a dual tensor (``x += y``, ``x.mul_(s)``, ``F.silu(x, inplace=True)``): the out-of-place
    op through its rule, then the result swapped into ``x``'s tensor object (``torch.utils.swap_tensors``), so
    every Python reference to ``x`` sees the new values, as with an in-place op. The old primal and tangent
    are left as they were: what an earlier op saved of them, a checkpoint's inputs, a tangent another dual
    tensor shares, stay valid. Refused (``DualizeError``) where that differs from an in-place op: when
    another tensor shares ``x``'s storage (a view of ``x``, or ``x`` a view of another: an in-place op would
    change both), when ``x`` carries no tangent but the other operand does, under ``torch.compile``'s trace,
    and for the in-place ops without a twin here (``copy_``, ``__setitem__``, ``out=``)."""
    from sgflow.autodual.attention import LazyDual

    name = getattr(func, "__name__", "")
    inplace_kw = kwargs.get("inplace") is True
    x = args[0] if args else kwargs.get("input")
    if kwargs.get("out") is not None or not (inplace_kw or name in _INPLACE_TWINS):
        return inplace_error(func, args, kwargs)
    if not isinstance(x, DualTensor):
        raise fail(func, "in-place op on a tensor without a tangent, with an operand that carries one (the "
                         "tensor cannot become a dual tensor in place)", "Write it out of place (`x = x + y`)")
    if isinstance(x, _TracedDual):
        raise fail(func, "in-place op on a tensor that carries a tangent, under torch.compile's trace",
                   "Write it out of place (`x = x + y`, `F.silu(x)`), or run the model eagerly")
    if getattr(x, "_sgflow_model_input", False):
        raise fail(func, "in-place op on an input of the model (x, t or u): sgflow calls the model more than once "
                         "on the same inputs (the plan's profile, the stop-gradient velocity), which must not "
                         "change", "Write it out of place (`x = x * 2`)")
    lazy = isinstance(x, LazyDual) and x._cache is None  # nothing computed yet: no storage, no views of it
    # A block's recomputation in backward (no dual forward runs: current() is AT_REST) replays ops its forward
    # checked, while checkpoint holds detached aliases of what the block saved: not views of the user's.
    if not lazy and current() is not AT_REST and _storage_users(x._primal) > _own_users(x):
        raise fail(func, "in-place op on a tensor that carries a tangent and shares its storage with another "
                         "tensor (a view of it, or it is a view): updating it out of place would leave the "
                         "other one stale", "Write it out of place (`x = x + y`), or make the view after it")
    if inplace_kw:
        twin, kwargs = func, {**kwargs, "inplace": False}
    else:
        twin = getattr(torch.Tensor, _INPLACE_TWINS[name])
    out = dispatch(twin, args, kwargs)
    if isinstance(out, DualTensor) and out.shape == x.shape and out.dtype != x.dtype \
            and out.is_floating_point() and x.is_floating_point():
        out = dispatch(torch.Tensor.to, (out, x.dtype), {})  # an in-place op keeps the tensor's dtype
    if not isinstance(out, DualTensor) or out.shape != x.shape or out.dtype != x.dtype:
        raise fail(func, f"in-place op whose result ({tuple(getattr(out, 'shape', ()))}, "
                         f"{getattr(out, 'dtype', None)}) differs from the tensor's ({tuple(x.shape)}, {x.dtype})")
    try:  # a fused node awaiting its consumer (GroupNorm + SiLU before a conv) stays lazy in x
        torch.utils.swap_tensors(x, out)
    except RuntimeError as e:  # e.g. a weak reference to the tensor object
        raise fail(func, f"in-place op on a tensor that carries a tangent, whose object cannot be updated ({e})",
                   "Write it out of place (`x = x + y`)") from e
    return x


def control_flow_error(func, args, kwargs):
    raise fail(
        func,
        "Python control flow or a Python number taken from a tensor that carries a tangent (the value "
        "would drop its tangent, and a branch on it can differ when the block is recomputed in backward)",
        "Compute on tensors (torch.where, masks as weights) or move the check outside the model's forward",
    )


# ---------------------------------------------------------------------------------------------
# Linear ops: the tangent is the same op applied to the tangents


_METADATA_ARG_OPS = {"view_as", "expand_as", "reshape_as", "type_as"}


def linear(func, args, kwargs):
    """``y_dot = op(x_dot)`` for ops linear in their tensor data (zeros for data without tangent)."""
    out = func(*unwrap_primals(args), **unwrap_primals(kwargs))
    flat, spec, idx = dual_leaves(args, kwargs)
    name = getattr(func, "__name__", "")
    first_tensor = next((i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)), None)
    tflat = []
    for i, a in enumerate(flat):
        if isinstance(a, DualTensor):
            tflat.append(a._tangent if (name not in _METADATA_ARG_OPS or i == first_tensor) else a._primal)
        elif isinstance(a, torch.Tensor) and a.is_floating_point() and not (name in _METADATA_ARG_OPS and i != first_tensor):
            tflat.append(torch.zeros_like(a))
        else:
            tflat.append(a)
    if name == "view":
        # The tangent can be strided differently from the primal (a product-rule sum, a transpose):
        # reshape gives the same values where view would refuse.
        a, k = unflatten_args(tflat, spec)
        if len(a) > 1 and isinstance(a[1], torch.dtype) or "dtype" in k:
            return wrap_outputs(out, None)
        t = a[0].reshape(*a[1:], **k) if a[1:] else a[0]
    else:
        t = call_flat(func, tflat, spec)
    return wrap_outputs(out, t)




_PLAIN_ADDS = {torch.add, _T.add, _T.__add__, _T.__radd__}


def affine(positions):
    """Rule for ops affine in the arguments at ``positions`` (add, sub, where, masked_fill, pad):
    the tangent is the op with tangents there and zeros for every other data value."""

    def rule(func, args, kwargs):
        if func in _PLAIN_ADDS and len(args) == 2 and not kwargs:
            from sgflow.autodual.rules.fusions import gn_modulate_shift

            # group_norm(x) * m + s (ADM's adaptive norm): the lazy modulated node takes the shift (either
            # operand); computed unfused, it is the plain sum (commutative: the operands' order does not matter).
            for node, shift in ((args[0], args[1]), (args[1], args[0])):
                r = gn_modulate_shift(node, shift, lambda n, s: plain(torch.add, (n, s), {}))
                if r is not None:
                    return r
        return plain(func, args, kwargs)

    def plain(func, args, kwargs):
        out = func(*unwrap_primals(args), **unwrap_primals(kwargs))
        ref = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, DualTensor))
        zero = torch.zeros((), dtype=ref._tangent.dtype, device=ref._tangent.device)
        targs = list(args)
        tkw = dict(kwargs)
        for pos in positions:
            if isinstance(pos, int):
                if pos < len(targs):
                    a = targs[pos]
                    targs[pos] = a._tangent if isinstance(a, DualTensor) else (zero if pos == 0 else 0)
            elif pos in tkw:
                a = tkw[pos]
                tkw[pos] = a._tangent if isinstance(a, DualTensor) else 0
        targs = [primal(a) for a in targs]
        tkw = {k: primal(v) for k, v in tkw.items()}
        t = func(*targs, **tkw)
        return wrap_outputs(out, _fit(t, out.shape))

    return rule
