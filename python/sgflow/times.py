"""Sampling of time pairs (t, u) with 0 <= t <= u <= 1.

SGFlow's stationary-point theorem needs positive probability on the diagonal t = u (where the loss
is flow matching and the model learns the velocity) and on t < u (where it learns the jumps).
"""
from __future__ import annotations

import torch


class TimeSampler:
    """Draw ``(t, u)`` of shape [B] each, 0 <= t <= u <= 1.

    Args:
        kind: ``"uniform"`` (uniform on the triangle t <= u) or ``"logit_normal"`` (each time
            sigmoid(N(mean, std)), the pair sorted).
        diagonal_fraction: probability that a sample lies on the diagonal u = t (default 0.5: with
            0.25, SGFlow training diverged on the two-moons set while its velocity estimate was poor).
        mean, std: logit-normal parameters.
    """

    KINDS = ("uniform", "logit_normal")

    def __init__(self, kind: str = "uniform", diagonal_fraction: float = 0.5, mean: float = 0.0, std: float = 1.0):
        if kind not in self.KINDS:
            raise ValueError(f"unknown time distribution {kind!r}; expected one of {self.KINDS}")
        if not 0.0 <= diagonal_fraction <= 1.0:
            raise ValueError(f"diagonal_fraction must lie in [0, 1], got {diagonal_fraction}")
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.kind, self.diagonal_fraction, self.mean, self.std = kind, diagonal_fraction, mean, std

    def _draw(self, n, device, dtype, generator):
        if self.kind == "uniform":
            return torch.rand(n, 2, device=device, dtype=dtype, generator=generator)
        z = torch.randn(n, 2, device=device, dtype=dtype, generator=generator)
        return torch.sigmoid(self.mean + self.std * z)

    def __call__(self, batch_size: int, device=None, dtype=torch.float32, generator=None):
        pair = self._draw(batch_size, device, dtype, generator)
        t, u = pair.min(dim=1).values, pair.max(dim=1).values
        on_diag = torch.rand(batch_size, device=device, dtype=dtype, generator=generator) < self.diagonal_fraction
        # For the diagonal draw t from the marginal of one time, not the min, so it stays uniform.
        u = torch.where(on_diag, pair[:, 0], u)
        t = torch.where(on_diag, pair[:, 0], t)
        return t, u

    def __repr__(self):
        return f"TimeSampler(kind={self.kind!r}, diagonal_fraction={self.diagonal_fraction})"
