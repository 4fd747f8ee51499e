r"""Dual (primal + tangent) sinusoidal time embedding.

Shapes: ``s, s_dot: [B]`` (times, typically in [0, 1]); outputs ``emb, emb_dot: [B, dim]``.

Convention (DDPM / "Attention is all you need" style, cos first): with ``half = dim // 2``,

    omega_k = scale * max_period^(-k / half),  k = 0 .. half-1        (angular frequencies)
    a_bk    = s_b omega_k
    emb     = [cos(a), sin(a)]          (plus one zero column when dim is odd)
    emb_dot = s_dot * d emb/ds = s_dot * omega * [-sin(a), cos(a)]

``scale`` (default 1, see DEFAULT_SCALE) multiplies the times in [0, 1] before the sinusoids; the
fastest frequency, and so the size of d emb / ds, grows with it.

Backward with cotangents ``G``, ``Gd`` ([B, dim], either may be missing), using
d^2 emb / ds^2 = -omega^2 emb:

    ds    = sum_k G d emb/ds + Gd s_dot d^2 emb/ds^2
    ds_dot = sum_k Gd d emb/ds

Only ``s`` and ``s_dot`` ([B] each) are saved. The Function has a ``setup_context`` and
``generate_vmap_rule`` so ``torch.func`` (vmap, grad, vjp) composes with it.

Module layout (see docs/DESIGN.md): :func:`sinusoidal_embedding_dual_ref`,
:class:`SinusoidalEmbeddingDual`, :func:`sinusoidal_embedding_dual`; the primal-only
:func:`sinusoidal_embedding` shares the convention.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "sinusoidal_embedding",
    "sinusoidal_embedding_dual_ref",
    "SinusoidalEmbeddingDual",
    "sinusoidal_embedding_dual",
]

# Times live in [0, 1]. A large scale (DDPM's 1000) makes d ftilde / dt three orders of magnitude
# larger than the x-derivatives, and the t-direction JVPs of SGFlow / MeanFlow with it; on the 2-D
# ring mixture (MLP 128x3, 1500 steps, fused SGFlow) the 1-step energy distance was 0.054 with scale
# 1, 0.061 with 10 and 100, and 0.146 with 1000, so the default keeps times unscaled.
DEFAULT_SCALE = 1.0


def _omega(dim: int, max_period: float, scale: float, ref: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    k = torch.arange(half, device=ref.device, dtype=ref.dtype)
    return scale * torch.exp(-math.log(max_period) * k / half)


def _pad(x: torch.Tensor, dim: int) -> torch.Tensor:
    if dim % 2:
        x = torch.cat([x, x.new_zeros(x.shape[0], 1)], 1)
    return x


def sinusoidal_embedding(s: torch.Tensor, dim: int, max_period: float = 10000, scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """Primal embedding ``[cos(s omega), sin(s omega)]``: [B] -> [B, dim]; differentiable by autograd."""
    a = s[:, None] * _omega(dim, max_period, scale, s)[None]
    return _pad(torch.cat([torch.cos(a), torch.sin(a)], 1), dim)


def sinusoidal_embedding_dual_ref(s, s_dot, dim, max_period=10000, scale=DEFAULT_SCALE):
    """Reference: explicit ``(emb, s_dot * d emb/ds)``."""
    omega = _omega(dim, max_period, scale, s)[None]
    a = s[:, None] * omega
    c, sn = torch.cos(a), torch.sin(a)
    emb = torch.cat([c, sn], 1)
    emb_dot = s_dot[:, None] * torch.cat([-sn * omega, c * omega], 1)
    return _pad(emb, dim), _pad(emb_dot, dim)


class SinusoidalEmbeddingDual(torch.autograd.Function):
    """``(s, s_dot) -> (emb, emb_dot)``; see module doc."""

    generate_vmap_rule = True

    @staticmethod
    def forward(s, s_dot, dim, max_period, scale):
        return sinusoidal_embedding_dual_ref(s, s_dot, dim, max_period, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, s_dot, dim, max_period, scale = inputs
        ctx.save_for_backward(s, s_dot)
        ctx.dim, ctx.max_period, ctx.scale = dim, max_period, scale
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g, g_dot):
        s, s_dot = ctx.saved_tensors
        half = ctx.dim // 2
        omega = _omega(ctx.dim, ctx.max_period, ctx.scale, s)[None]
        a = s[:, None] * omega
        c, sn = torch.cos(a), torch.sin(a)
        d_emb = torch.cat([-sn * omega, c * omega], 1)  # d emb / ds, [B, 2 half]
        ds = dsd = None
        if g is not None:
            g = g[:, : 2 * half]
        if g_dot is not None:
            g_dot = g_dot[:, : 2 * half]
        if ctx.needs_input_grad[0]:
            if g is not None:
                ds = (g * d_emb).sum(1)
            if g_dot is not None:
                d2_emb = -(omega * omega).repeat(1, 2) * torch.cat([c, sn], 1)
                term = s_dot * (g_dot * d2_emb).sum(1)
                ds = term if ds is None else ds + term
        if ctx.needs_input_grad[1] and g_dot is not None:
            dsd = (g_dot * d_emb).sum(1)
        return ds, dsd, None, None, None


def sinusoidal_embedding_dual(s, s_dot, dim, max_period=10000, scale=DEFAULT_SCALE):
    """Dual sinusoidal embedding.

    Args:
        s, s_dot: [B] floating times and their tangents.
        dim: embedding width (>= 2; an odd dim gets a trailing zero column).
        max_period: ratio between the slowest and fastest frequency.
        scale: multiplies s before the sinusoids (times in [0, 1] -> [0, scale]).

    Returns:
        ``(emb, emb_dot)``, each [B, dim].
    """
    if not isinstance(s, torch.Tensor) or s.dim() != 1:
        raise ValueError(f"s must be a 1-d tensor of times [B], got {getattr(s, 'shape', type(s))}")
    if not s.is_floating_point():
        raise TypeError(f"s must be floating point, got {s.dtype}")
    if s_dot.shape != s.shape or s_dot.dtype != s.dtype or s_dot.device != s.device:
        raise ValueError(f"s_dot must match s ({tuple(s.shape)}, {s.dtype}), got {tuple(s_dot.shape)}, {s_dot.dtype}")
    if int(dim) < 2:
        raise ValueError(f"embedding dim must be >= 2, got {dim}")
    return SinusoidalEmbeddingDual.apply(s, s_dot, int(dim), float(max_period), float(scale))
