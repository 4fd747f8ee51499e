"""Sample-quality metrics: energy distance, sliced Wasserstein, Frechet distance of features."""
from __future__ import annotations

import torch


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (>= 0, zero iff equal laws). x: [n, d], y: [m, d].

    Uses the U-statistic (diagonal excluded) for the within-sample terms so it is unbiased.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"energy_distance needs [n, d] and [m, d], got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (n * (n - 1))
    dyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return 2 * dxy - dxx - dyy


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, generator=None) -> torch.Tensor:
    """Sliced 2-Wasserstein distance over random unit directions. x, y: [n, d] (same n)."""
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"sliced_wasserstein needs two [n, d] tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    x, y = x.double(), y.double()
    dirs = torch.randn(x.shape[1], projections, dtype=torch.float64, generator=generator)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, dim=0)
    py, _ = torch.sort(y @ dirs, dim=0)
    return ((px - py) ** 2).mean().sqrt()
