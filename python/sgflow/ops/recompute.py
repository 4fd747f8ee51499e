"""Recompute a whole dual block in backward instead of keeping its intermediates.

``recompute_dual(fn, x, x_dot, params, extra)`` runs ``(y, y_dot) = fn(x, x_dot, *extra)`` without a
graph and keeps only ``x``, ``x_dot`` and ``extra``; backward runs ``fn`` again with a graph (its dual
ops then save what their own backward needs, for this block only) and differentiates it. This is
activation checkpointing applied to a primal + tangent block: peak memory of the step holds one
block's intermediates at a time, at the price of one more forward of the block.

Random draws inside ``fn`` (dropout masks) are replayed: the RNG state of x's device is saved before
the forward and restored for the recomputation, so both passes draw the same masks. The autocast
state of the forward is restored for the recomputation too (backward usually runs outside it).

:class:`RecomputeDual` has the modern ``setup_context`` form. Its ``setup_context`` sees only the
inputs and outputs, after ``fn`` has drawn its masks, so the RNG and autocast state are captured by
:func:`recompute_dual` before the call and passed in as an input (``replay``). ``torch.func``
transforms still do not compose with it: its backward re-runs ``fn`` with ``requires_grad_`` leaves
and ``torch.autograd.grad``, which functorch refuses inside a transform, and ``fn`` reads the
parameters by closure, so ``torch.func.vjp`` of ``fn`` could not reach them either. Hence no vmap
rule (``torch.func.vmap`` raises at the forward; with a generated rule it got through the forward
and failed in backward at ``requires_grad_``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable


class _Replay:
    """RNG and autocast state at the start of a block's forward, restored for its recomputation."""

    def __init__(self, x: torch.Tensor):
        self.device = x.device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        dt = x.device.type
        self.autocast = (dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))


def _recompute_backward(ctx, g_y, g_ydot):
    x, x_dot, *extra = ctx.saved_tensors
    need = ctx.needs_input_grad
    inputs = [x.detach().requires_grad_(need[3]), x_dot.detach().requires_grad_(need[4])]
    extra = [e.detach().requires_grad_(need[5 + i]) for i, e in enumerate(extra)]
    params = ctx.params
    replay = ctx.replay
    devices = [replay.device] if replay.cuda_rng is not None else []
    device_type, autocast_on, autocast_dtype = replay.autocast
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(replay.cpu_rng)
        if replay.cuda_rng is not None:
            torch.cuda.set_rng_state(replay.cuda_rng, replay.device)
        with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            y, y_dot = ctx.fn(inputs[0], inputs[1], *extra)
    wrt = [t for t in (*inputs, *extra, *params) if t.requires_grad]
    outs, grads_out = [], []
    for out, g in ((y, g_y), (y_dot, g_ydot)):
        if g is not None and out.requires_grad:
            outs.append(out)
            grads_out.append(g)
    grads = torch.autograd.grad(outs, wrt, grads_out, allow_unused=True) if outs and wrt else [None] * len(wrt)
    it = iter(grads)
    result = [next(it) if t.requires_grad else None for t in (*inputs, *extra, *params)]
    return (None, None, None, *result)


class RecomputeDual(torch.autograd.Function):
    """forward(fn, n_extra, replay, x, x_dot, *extra, *params) -> (y, y_dot) keeping only x, x_dot and
    extra; ``replay`` is the :class:`_Replay` state taken just before the call."""

    @staticmethod
    def forward(fn, n_extra, replay, x, x_dot, *rest):
        with torch.no_grad():
            y, y_dot = fn(x, x_dot, *rest[:n_extra])
        return y, y_dot

    @staticmethod
    def setup_context(ctx, inputs, output):
        fn, n_extra, replay, x, x_dot, *rest = inputs
        ctx.fn, ctx.replay = fn, replay
        ctx.params = rest[n_extra:]
        ctx.save_for_backward(x, x_dot, *rest[:n_extra])

    # The recomputed graph is differentiated without create_graph: no double backward.
    backward = staticmethod(once_differentiable(_recompute_backward))


def recompute_dual(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    x_dot: torch.Tensor,
    params: Sequence[torch.Tensor],
    extra: Sequence[torch.Tensor] = (),
):
    """``fn(x, x_dot, *extra) -> (y, y_dot)`` with its intermediates recomputed in backward.

    Args:
        fn: a dual block built from sgflow dual ops; it must only depend on ``x``, ``x_dot``,
            ``extra`` and ``params`` (the parameters it reads, so their gradients are returned).
        x, x_dot: [B, ...] block input and its tangent. extra: other tensor inputs (e.g. the time
            embedding and its tangent).

    Without grad mode (sampling, the stop-gradient forward) ``fn`` is simply called.
    """
    if not torch.is_grad_enabled():
        return fn(x, x_dot, *extra)
    return RecomputeDual.apply(fn, len(extra), _Replay(x), x, x_dot, *extra, *params)
