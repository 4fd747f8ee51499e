"""Helpers for gradient-equivalence tests of dual (primal + tangent) ops against torch.func.jvp."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||`` in float64 (``||a||`` when ``b`` is zero)."""
    a = a.detach().double()
    b = b.detach().double()
    denom = b.norm()
    if denom == 0:
        return a.norm().item()
    return ((a - b).norm() / denom).item()


def jvp_reference(
    fn: Callable[..., torch.Tensor],
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor] = (),
    cotangents: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
):
    """Reference output, tangent and gradients of a function via ``torch.func.jvp`` + autograd.

    Computes ``y, y_dot = jvp(fn, primals, tangents)`` and the gradients of
    ``<g, y> + <g_dot, y_dot>`` with respect to ``primals``, ``tangents`` and ``params`` (tensors
    closed over by ``fn``), where ``(g, g_dot)`` are ``cotangents`` or seeded Gaussian draws.

    Returns ``(y, y_dot, (g, g_dot), grads)`` with ``grads`` a list matching
    ``[*primals, *tangents, *params]`` (``None`` where a tensor does not influence the output).
    """
    primals = [p.detach().clone().requires_grad_(True) for p in primals]
    tangents = [t.detach().clone().requires_grad_(True) for t in tangents]
    y, y_dot = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    if cotangents is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y)
        g_dot = torch.randn(y_dot.shape, generator=gen, dtype=torch.float64).to(y_dot)
    else:
        g, g_dot = cotangents
    scalar = (y * g).sum() + (y_dot * g_dot).sum()
    inputs = [*primals, *tangents, *params]
    grads = torch.autograd.grad(scalar, inputs, allow_unused=True)
    return y.detach(), y_dot.detach(), (g, g_dot), list(grads)


def dual_grads(
    dual_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    cotangents: tuple[torch.Tensor, torch.Tensor],
):
    """Output, tangent and gradients of a dual op ``dual_fn(*primals, *tangents) -> (y, y_dot)``.

    Same contract as :func:`jvp_reference` so the two can be compared entry by entry.
    """
    primals = [p.detach().clone().requires_grad_(True) for p in primals]
    tangents = [t.detach().clone().requires_grad_(True) for t in tangents]
    y, y_dot = dual_fn(*primals, *tangents)
    g, g_dot = cotangents
    scalar = (y * g).sum() + (y_dot * g_dot).sum()
    inputs = [*primals, *tangents, *params]
    grads = torch.autograd.grad(scalar, inputs, allow_unused=True)
    return y.detach(), y_dot.detach(), list(grads)


def grad_errors(
    got: Sequence[torch.Tensor | None],
    want: Sequence[torch.Tensor | None],
    like: Sequence[torch.Tensor],
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Relative error of each gradient in ``got`` against ``want`` (lists as returned by
    :func:`dual_grads` / :func:`jvp_reference`), keyed by ``names`` (default: the index as a string).

    ``None`` (an input without influence on the output) counts as zeros shaped like the matching
    tensor of ``like``, so a gradient that is None on one side and non-zero on the other is an error.
    """
    names = [str(i) for i in range(len(like))] if names is None else names
    errors = {}
    for name, a, b, ref in zip(names, got, want, like):
        a = torch.zeros_like(ref) if a is None else a
        b = torch.zeros_like(ref) if b is None else b
        errors[name] = rel_err(a, b)
    return errors
