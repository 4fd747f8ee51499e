"""Helpers shared by the registered ``sgflow::`` ops (torch.library).

:func:`register_loop_vmap` gives an op a ``torch.func.vmap`` rule that runs it once per vmapped index
and stacks the results: correct for any op (each call is the op itself), linear in the vmapped size.
The dual ops are whole-tensor kernels (one launch per layer), so vmapping over them is a convenience for
``torch.func`` composition (per-sample gradients, ensembles), not a fast path.
"""
from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

__all__ = ["add_unless_held", "once", "register_loop_vmap"]


def once(fn):
    """Cache ``fn()`` (no arguments) after its first call, e.g. a lazy op registration.

    Unlike ``functools.lru_cache``, whose body torch.compile inlines and re-runs on every trace (a
    registration there is a graph break), the cached value sits in a dict that dynamo reads as a constant.
    """
    cache: dict = {}

    @functools.wraps(fn)
    def wrapper():
        if "value" not in cache:
            cache["value"] = fn()
        return cache["value"]

    return wrapper


def register_loop_vmap(op) -> None:
    """Register a vmap rule for ``op`` (a custom op or an ``OpOverload``) that loops over the vmapped dim.

    Outputs that are None in every call stay None (not batched).
    """
    fn = op
    if isinstance(op, str):  # "namespace::name": an op defined elsewhere (e.g. in C++)
        ns, name = op.split("::")
        fn = getattr(getattr(torch.ops, ns), name).default

    def rule(info, in_dims, *args):
        outs, is_tuple = [], True
        for i in range(info.batch_size):
            out = fn(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)])
            is_tuple = isinstance(out, tuple)
            outs.append(out if is_tuple else (out,))
        stacked, dims = [], []
        for parts in zip(*outs):
            unbatched = all(p is None for p in parts)
            stacked.append(None if unbatched else torch.stack(parts))
            dims.append(None if unbatched else 0)
        return (tuple(stacked), tuple(dims)) if is_tuple else (stacked[0], dims[0])

    torch.library.register_vmap(op, rule)


def add_unless_held(y: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``y + other``, in place into ``y`` (a fresh op output: no extra activation) unless something else
    may hold ``y``: a dispatch mode, such as selective checkpointing's cache of conv/matmul outputs, which
    forbids mutating them. Modes that only observe (a class attribute ``sgflow_observer = True``, as on
    :class:`sgflow.memory.PeakTensorBytes`, and FLOP counting) are ignored, so that measuring a step does not
    change what it allocates. Compiled, always out of place (reading the mode stack is a graph break;
    inductor fuses the add either way)."""
    if torch.compiler.is_compiling() or not all(_observes_only(m) for m in _get_current_dispatch_mode_stack()):
        return y + other
    return y.add_(other)


def _observes_only(mode) -> bool:
    from torch.utils.flop_counter import _FlopCounterMode
    return getattr(mode, "sgflow_observer", False) or isinstance(mode, _FlopCounterMode)
