r"""Resampling by an integer factor ``s``: nearest upsampling and average pooling over ``s x s`` blocks, as
copies and sums of strided slices, and their backward.

Shapes: ``x: [N, C, H, W]``; ``repeat(x, s): [N, C, sH, sW]``; ``block_sum(x, s): [N, C, H/s, W/s]`` (H, W
divisible by s).

    upsample (nearest):  y[n, c, i, j] = x[n, c, i // s, j // s]       = repeat(x, s)
                         dx = block_sum(dy, s)
    average pooling:     y = block_sum(x, s) / s^2,                    dx = repeat(dy / s^2, s)

They give ``F.interpolate(x, scale_factor=s, mode="nearest")`` (bit for bit: a copy) and ``F.avg_pool2d(x, s)``
(to rounding: the block is summed in another order). Why not those: on CPU ``F.interpolate`` of a
[32, 64, 16, 16] activation took 6.3-7.5 ms (it makes channels-last copies), :func:`repeat` 2.0 ms;
``F.avg_pool2d`` of a [32, 64, 32, 32] one 4.6 ms, :func:`block_sum` 1.3 ms (one thread;
benchmarks/NOTES.md, issue 18 part 12). Both are plain tensor ops (no kernels), so they trace and run on any
device.

Layout (docs/DESIGN.md): references :func:`upsample_nearest_ref` / :func:`avg_pool_ref` (the torch calls), the
primitives :func:`repeat` / :func:`block_sum`, :func:`resample` / :func:`resample_backward` for the fused
ops that recompute a resampled activation (``sgflow.ops.gn_silu_conv``), and :class:`ResampleDual`, the dual
engine's resampling of a computed dual tensor (``F.interpolate`` / ``F.avg_pool2d`` rule).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["upsample_nearest_ref", "avg_pool_ref", "repeat", "block_sum", "resample", "resample_backward",
           "ResampleDual"]


def upsample_nearest_ref(x: torch.Tensor, s: int) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=s, mode="nearest")``: [N, C, H, W] -> [N, C, sH, sW]."""
    return F.interpolate(x, scale_factor=float(s), mode="nearest")


def avg_pool_ref(x: torch.Tensor, s: int) -> torch.Tensor:
    """``F.avg_pool2d(x, s)``: [N, C, H, W] -> [N, C, H/s, W/s]."""
    return F.avg_pool2d(x, s)


def repeat(x: torch.Tensor, s: int) -> torch.Tensor:
    """Each pixel of x [N, C, H, W] as an ``s x s`` block: [N, C, sH, sW] (contiguous).

    Two broadcast copies: columns first (runs of s equal values), then whole rows repeated, which copy as
    contiguous rows (one broadcast copy over both dims strides through memory at ~2x the time)."""
    n, c, h, w = x.shape
    cols = x.unsqueeze(-1).expand(n, c, h, w, s).reshape(n, c, h, w * s)
    # contiguous(): where W or H is 1 the reshapes are views of the broadcast (stride 0), not copies.
    return cols.unsqueeze(3).expand(n, c, h, s, w * s).reshape(n, c, h * s, w * s).contiguous()


def block_sum(x: torch.Tensor, s: int) -> torch.Tensor:
    """The sum over each ``s x s`` block of x [N, C, H, W] (H, W divisible by s): [N, C, H/s, W/s].

    Rows of a block added as slices (contiguous rows), then columns as strided slices: ``s - 1`` adds each,
    where ``sum`` over the small strided dims runs ~10x slower on CPU."""
    n, c, h, w = x.shape
    rows = _sum_of_slices(x.view(n, c, h // s, s, w), 3)
    return _sum_of_slices(rows.view(n, c, h // s, w // s, s), 4)


def _sum_of_slices(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``v`` summed over ``dim`` as adds of its slices (a new tensor, never a view of v)."""
    k = v.shape[dim]
    if k == 1:
        return v.select(dim, 0).clone()
    out = torch.add(v.select(dim, 0), v.select(dim, 1))
    for i in range(2, k):
        out.add_(v.select(dim, i))
    return out


def resample(x: torch.Tensor, spec) -> torch.Tensor:
    """``x`` [N, C, H, W] resampled as ``spec`` says: None (x itself), ``("nearest", s)`` (:func:`repeat`) or
    ``("avg", s)`` (:func:`block_sum` / s^2)."""
    if spec is None:
        return x
    mode, s = spec
    if mode == "nearest":
        return repeat(x, s)
    return block_sum(x, s).mul_(1.0 / (s * s))


def resample_backward(g: torch.Tensor, spec) -> torch.Tensor:
    """The gradient of :func:`resample`'s input from its output's ``g`` (``spec`` not None)."""
    mode, s = spec
    if mode == "nearest":
        return block_sum(g, s)
    return repeat(g * (1.0 / (s * s)), s)


class ResampleDual(torch.autograd.Function):
    """``(x, x_dot, spec) -> (resample(x, spec), resample(x_dot, spec))``: the dual engine's nearest upsampling /
    average pooling of a computed dual tensor (x, x_dot: [N, C, H, W]; ``spec`` as :func:`resample`, not None).
    Saves nothing (the op is linear); backward :func:`resample_backward` per stream."""

    @staticmethod
    def forward(ctx, x, x_dot, spec):
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return resample(x, spec), resample(x_dot, spec)

    @staticmethod
    def backward(ctx, g, g_dot):
        return (None if g is None else resample_backward(g, ctx.spec),
                None if g_dot is None else resample_backward(g_dot, ctx.spec), None)
