"""Normalisation statistics and the normalised input's tangent, written once for every dual path.

Used by the dual engine's norm rules (``autodual/rules/norms.py``), the dual GroupNorm op (``ops/groupnorm.py``)
and the decomposed norms of the reference loss (``decompose.py``). The fused GroupNorm-SiLU op's reference
(``ops/groupnorm_silu.groupnorm_silu_dual_ref``) keeps its own explicit formulas on purpose: it is what the
kernels and these functions are checked against.

For x normalised over ``dims`` (mean mu, biased variance var, r = 1 / sqrt(var + eps)):

    x̂ = (x - mu) r,    x̂_dot = r (x_dot - mean(x_dot) - x̂ mean(x̂ x_dot))

and for the RMS norm (no centring), r = 1 / sqrt(mean(x²) + eps), x̂ = x r, x̂_dot = r (x_dot - x̂ mean(x̂ x_dot)).
Plain means and elementwise ops only: every order of derivative goes through ordinary autograd rules.
"""
from __future__ import annotations

import torch


def moments(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, centred input and biased variance of ``x`` over ``dims`` (kept as size-1 dims).

    Two plain means rather than a fused variance kernel: only elementwise and reduction rules enter the
    derivatives of every order."""
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    return mean, centred, centred.square().mean(dims, keepdim=True)


def normalize_dual(x: torch.Tensor, x_dot: torch.Tensor, dims, eps: float, rms: bool = False):
    """``(x̂, x̂_dot)``: ``x`` normalised over ``dims`` and its tangent along ``x_dot`` (module doc), in the
    inputs' dtype (callers upcast half precision first). x, x_dot: the same shape, any layout."""
    if rms:
        r = torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        xh = x * r
        return xh, r * (x_dot - xh * (xh * x_dot).mean(dims, keepdim=True))
    _, centred, var = moments(x, dims)
    r = torch.rsqrt(var + eps)
    xh = centred * r
    return xh, r * (x_dot - x_dot.mean(dims, keepdim=True) - xh * (xh * x_dot).mean(dims, keepdim=True))
