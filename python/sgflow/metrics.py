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


def gaussian_frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """Frechet (2-Wasserstein) distance squared between N(mu1, cov1) and N(mu2, cov2):

        ||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1^{1/2} cov2 cov1^{1/2})^{1/2}).

    mu: [d]; cov: [d, d] symmetric PSD. Computed in float64 with symmetric eigendecompositions
    (Tr (C1 C2)^{1/2} = Tr (C1^{1/2} C2 C1^{1/2})^{1/2}, a PSD matrix), so no complex sqrtm.
    """
    mu1, mu2, cov1, cov2 = mu1.double(), mu2.double(), cov1.double(), cov2.double()
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError("gaussian_frechet_distance needs means [d] and covariances [d, d] of one size")
    ev1, vec1 = torch.linalg.eigh(cov1)
    sqrt1 = (vec1 * ev1.clamp_min(0).sqrt()) @ vec1.T
    mid = sqrt1 @ cov2 @ sqrt1
    tr_cross = torch.linalg.eigvalsh(0.5 * (mid + mid.T)).clamp_min(0).sqrt().sum()
    return (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_cross


def feature_stats(feats: torch.Tensor):
    """Mean [d] and unbiased covariance [d, d] of features [n, d] (float64)."""
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_stats needs [n, d] with n >= 2, got {tuple(feats.shape)}")
    f = feats.double()
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
    """Frechet distance between Gaussians fitted to two feature sets [n, d] and [m, d] (FID's formula)."""
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"frechet_distance needs [n, d] and [m, d], got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    return gaussian_frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


def flow_map_mse(pred: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Mean squared error per coordinate, mean over samples of mean_sq(pred - exact). [n, *D] -> scalar."""
    if pred.shape != exact.shape:
        raise ValueError(f"flow_map_mse needs equal shapes, got {tuple(pred.shape)} and {tuple(exact.shape)}")
    return (pred.double() - exact.double()).pow(2).flatten(1).mean(1).mean()
