"""Recompute a whole dual block in backward instead of keeping its intermediates.

``recompute_dual(fn, x, x_dot, params, extra)`` runs ``(y, y_dot) = fn(x, x_dot, *extra)`` keeping only
what the block's inputs are (x, x_dot, extra); backward runs ``fn`` again and differentiates it (its
dual ops then save what their own backward needs, for this block only). This is activation
checkpointing applied to a primal + tangent block, and it is exactly that: PyTorch's non-reentrant
``torch.utils.checkpoint``, which

- finds every tensor the block uses through autograd, so parameters reach their gradients whether or
  not the caller lists them (``params`` is only checked, see below);
- replays random draws (dropout masks: the RNG state of x's device is saved before the forward and
  restored for the recomputation) and the forward's autocast state;
- is traced by torch.compile as one region (no graph break), when the block draws nothing
  (``preserve_rng_state=False``): reading the RNG state is a break.

Peak memory of the step then holds one block's intermediates at a time, at the price of one more
forward of the block.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint


def recompute_dual(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    x_dot: torch.Tensor,
    params: Sequence[torch.Tensor] = (),
    extra: Sequence[torch.Tensor] = (),
    preserve_rng_state: bool = True,
):
    """``fn(x, x_dot, *extra) -> (y, y_dot)`` with its intermediates recomputed in backward.

    Args:
        fn: a dual block built from sgflow dual ops (or any differentiable code).
        x, x_dot: [B, ...] block input and its tangent. extra: other tensor inputs (e.g. the time
            embedding and its tangent).
        params: the parameters ``fn`` reads. Not needed (checkpointing finds them); kept so that old
            call sites work, and checked: every entry must be a tensor.
        preserve_rng_state: replay the forward's random draws (dropout masks) in the recomputation, as
            ``torch.utils.checkpoint``'s flag of that name. Pass False for a block that draws nothing:
            reading the RNG state is a graph break under torch.compile.

    Returns:
        (y, y_dot) as ``fn`` returns them. Without grad mode (sampling, the stop-gradient forward) ``fn`` is
        simply called.
    """
    bad = [type(p).__name__ for p in params if not isinstance(p, torch.Tensor)]
    if bad:
        raise TypeError(f"recompute_dual: params must be tensors, got {bad}")
    if not torch.is_grad_enabled():
        return fn(x, x_dot, *extra)
    return checkpoint(fn, x, x_dot, *extra, use_reentrant=False, preserve_rng_state=preserve_rng_state)
