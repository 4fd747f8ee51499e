r"""Structural rules: metadata queries (``meta``), non-differentiable ops (``nondiff``), the errors for
in-place ops and Python control flow, and the ops linear or affine in their tensor data (``linear``,
``affine``: the tangent is the same op on the tangents)."""
from __future__ import annotations

import torch

from sgflow.autodual.rules.common import _T, _fit, _fns, _getters
from sgflow.autodual.tensor import (
    DerivedValue,
    DualTensor,
    call_flat,
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




def affine(positions):
    """Rule for ops affine in the arguments at ``positions`` (add, sub, where, masked_fill, pad):
    the tangent is the op with tangents there and zeros for every other data value."""

    def rule(func, args, kwargs):
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
