r"""``sgflow.dualize(model)``: the fused SGFlow path for any network, through its own ``forward``.

    dual = sgflow.dualize(model)                  # or just sgflow.fused_loss(model, x1)
    f, f_dot = dual.dual_forward(t, u, x, t_dot, u_dot, x_dot)   # f~ and its JVP

How: the inputs t, u, x become :class:`DualTensor`\ s (the primal, carrying its tangent) and the
model is called as usual — through ``model.__call__``, so forward hooks, adapters living in
``forward``, parameter wrappers and ``DistributedDataParallel.forward`` all run. Every torch op the
forward makes on a DualTensor is routed to a dual rule (:mod:`sgflow.autodual.rules`) that returns
the primal and the tangent as ordinary tensors, so autograd records both and the gradient flows
through the tangent (reverse over forward), as the SGFlow loss needs.

Memory: each recomputed *block* runs under ``torch.utils.checkpoint`` (non-reentrant): it keeps
only its inputs (primal and tangent) and recomputes its dual forward in backward, with the RNG state
(dropout masks) and autocast state of the forward replayed. Which blocks: by default chosen on the
first training call by a profile of the candidates (:mod:`sgflow.autodual.plan`), or fixed with
``blocks=`` (:func:`select_blocks`). Non-reentrant checkpointing finds every tensor
the block reads through autograd itself, so parameters reached through hooks or module attributes
get their gradients without being listed anywhere.

Shapes: t, u, t_dot, u_dot: [B]; x, x_dot: [B, *D]; returns (f~, JVP f~), both [B, *D].

Layout: ``blocks.py`` which submodules are recomputed (:func:`select_blocks`, :func:`candidate_blocks`),
``call.py`` one dual call (:func:`dual_call`: the forward patching, checkpointed blocks and row slices),
``tails.py`` the recomputed blocks' dead tails (convolutions and linear layers their recomputation skips),
``dualized.py`` :func:`dualize`, :class:`DualizedModel`, :func:`as_dual_model`; ``tensor.py`` the DualTensor
and the dispatch, ``rules/`` the dual rules, ``plan.py`` the measured choice of blocks (``profile.py`` its profile), ``attention.py`` the
lazy attention and GroupNorm nodes, ``traced.py`` the dual forward under torch.compile (one graph node traced by
AOTAutograd). This package re-exports every name of blocks.py, call.py and
dualized.py (``WRAPPER_SHARE`` read and set through to blocks.py) and defines :func:`register_rule`.
"""
from __future__ import annotations

from sgflow._forwarding import forward_globals
from typing import Callable

from sgflow.autodual import rules as _rules  # noqa: F401 - installs the rule tables
from sgflow.autodual.tensor import (  # noqa: F401 - re-exported
    AT_REST,
    DualContext,
    DualizeError,
    DualTensor,
    is_dual,
    make_dual,
    primal,
    current,
    dual_context,
    function_hook,
    register,
    tangent,
)
# The package by job (issue 20); every name it had is re-exported here: block selection (blocks.py), one
# dual call with its forward patching, checkpointing and row slices (call.py), dualize and DualizedModel
# (dualized.py).
from sgflow.autodual import blocks as _blocks, call as _call
from sgflow.autodual.blocks import (  # noqa: F401 - re-exported
    _CONTAINERS,
    _LINEAR_MAPS,
    _WRAPPERS,
    _auto_accept,
    _frontier,
    _inner,
    _is_plain_container,
    _n_params,
    _trunk,
    candidate_blocks,
    select_blocks,
)
from sgflow.autodual.call import (  # noqa: F401 - re-exported
    _cat_rows,
    _check_tangents,
    _checkpointed,
    _context_fn,
    _from_plain,
    _hooked,
    _matmul_ops,
    _patched,
    _row_slices,
    _save_matmul_policy,
    _to_plain,
    _wrap_forward,
    _zero_tangent,
    dual_call,
    patched_forwards,
)
from sgflow.autodual.dualized import (  # noqa: F401 - re-exported
    _CACHE_ATTR,
    DualizedModel,
    DualReport,
    as_dual_model,
    dualize,
)


__all__ = [
    "dualize", "DualizedModel", "DualizeError", "DualTensor", "DualReport", "select_blocks", "dual_call",
    "register_rule", "make_dual", "primal", "tangent", "is_dual", "as_dual_model", "candidate_blocks",
]


def register_rule(*funcs: Callable, kind: str = "rule:user"):
    """Decorator registering ``rule(func, args, kwargs)`` as the dual rule of ``funcs``.

    The rule receives the op's arguments (DualTensors among them; ``sgflow.autodual.primal`` /
    ``tangent`` unwrap them) and returns the result with ``make_dual(y, y_dot)`` where it has a tangent.
    """
    return register(funcs, kind)


# Module globals that the code reads from (or, for the lazy ``_MATMUL_OPS``, writes to) the module that
# defines them: reading or setting one on this package reads or sets it there (a plain re-export would be
# a copy that the code never reads).
forward_globals(__name__, {"WRAPPER_SHARE": _blocks, "_MATMUL_OPS": _call})
