"""Closed-form flow maps for Gaussian data under the linear interpolant (for tests and sanity checks).

Data N(m, s^2 I), noise N(0, I), X_t = (1-t) X_0 + t X_1: X_t ~ N(t m, sbar_t^2 I) with
sbar_t^2 = (1-t)^2 + t^2 s^2, and the exact flow map is affine,

    f(t, u, x) = u m + (sbar_u / sbar_t) (x - t m),

so f~ = (f - x)/(u - t) = m + D(t, u) (x - t m) with the form of D that stays smooth at u = t:

    D(t, u) = (sbar_u - sbar_t) / ((u - t) sbar_t) = ((u + t)(1 + s^2) - 2) / ((sbar_u + sbar_t) sbar_t).
"""
from __future__ import annotations

import torch
from torch import nn


def gaussian_sbar(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sbar_t = sqrt((1-t)^2 + t^2 s^2), the std of X_t."""
    return torch.sqrt((1 - t) ** 2 + t**2 * s**2)


def gaussian_flow_map_coefficient(t: torch.Tensor, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """D(t, u) above, [B]."""
    sb_t, sb_u = gaussian_sbar(t, s), gaussian_sbar(u, s)
    return ((u + t) * (1 + s**2) - 2) / ((sb_u + sb_t) * sb_t)


class GaussianAffineFlowMap(nn.Module):
    """An affine-in-x model family containing the exact Gaussian flow map.

        f~(t, u, x) = m_hat + gain * D_{s_hat}(t, u) * (x - t m_hat)

    Parameters: ``mean`` (m_hat, [d]), ``log_std`` (log s_hat) and ``gain``; the exact map is
    mean = m, log_std = log s, gain = 1. x: [B, d] -> f~: [B, d].
    """

    def __init__(self, dim: int, mean=None, std: float = 1.0, gain: float = 1.0, dtype=torch.float64):
        super().__init__()
        mean = torch.zeros(dim, dtype=dtype) if mean is None else torch.as_tensor(mean, dtype=dtype).clone()
        self.mean = nn.Parameter(mean)
        self.log_std = nn.Parameter(torch.tensor(float(std), dtype=dtype).log())
        self.gain = nn.Parameter(torch.tensor(float(gain), dtype=dtype))

    def forward(self, t: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        coef = self.gain * gaussian_flow_map_coefficient(t, u, self.log_std.exp())
        return self.mean + coef[:, None] * (x - t[:, None] * self.mean)
