r"""Fallback: PyTorch's forward AD (``torch.func.jvp``) for one op that has no rule of its own."""
from __future__ import annotations

import torch

from sgflow.autodual.tensor import call_flat, dual_leaves, fail, primal, wrap_outputs
from sgflow.forward_ad import missing_forward_ad


def forward_ad(func, args, kwargs):
    """``torch.func.jvp`` of this op alone, with the norms and SDPA decomposed inside it."""
    flat, spec, idx = dual_leaves(args, kwargs)
    pflat = [primal(a) for a in flat]

    def f(*ps):
        fl = list(pflat)
        for i, p in zip(idx, ps):
            fl[i] = p
        return call_flat(func, fl, spec)

    try:
        from sgflow.decompose import decomposed
    except ImportError:  # pragma: no cover - decompose ships with sgflow
        import contextlib

        decomposed = contextlib.nullcontext
    try:
        with decomposed():
            out, t = torch.func.jvp(f, tuple(pflat[i] for i in idx), tuple(flat[i]._tangent for i in idx))
    except (RuntimeError, NotImplementedError) as e:
        msg = str(e)
        if "return only tensors" in msg:
            return _no_tensor_result(func, pflat, spec)
        reason = missing_forward_ad(e)
        if reason is not None:
            raise fail(
                func,
                f"no sgflow dual rule, and PyTorch's forward AD fails on it ({reason})",
                "Register one with sgflow.autodual.register_rule, or compute this op outside the model",
            ) from e
        raise
    return wrap_outputs(out, t)


def _no_tensor_result(func, pflat, spec):
    """An op whose result holds no floating tensor (a Python number, a device): nothing to carry."""
    res = call_flat(func, pflat, spec)
    if any(isinstance(r, torch.Tensor) and r.is_floating_point() for r in _leaves(res)):
        raise fail(func, "returns tensors inside a structure forward AD cannot follow")
    return res


def _leaves(x):
    from torch.utils._pytree import tree_flatten

    return tree_flatten(x)[0]
