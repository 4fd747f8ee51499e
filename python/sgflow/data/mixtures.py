"""Gaussian mixtures with their exact probability-flow velocity and flow map.

For data X_1 ~ sum_k pi_k N(mu_k, diag(s_k^2)) and noise X_0 ~ N(0, I), given component k the pair
(X_t, Xdot_t) is jointly Gaussian with X_t ~ N(sigma_t mu_k, diag(alpha_t^2 + sigma_t^2 s_k^2)), so

    E[Xdot_t | X_t = x] = sum_k w_k(x) [ sigmadot_t mu_k + c_k(t) (x - sigma_t mu_k) ],
    c_k(t) = (alphadot_t alpha_t + sigmadot_t sigma_t s_k^2) / (alpha_t^2 + sigma_t^2 s_k^2),

with posterior weights w_k(x) proportional to pi_k N(x; sigma_t mu_k, alpha_t^2 + sigma_t^2 s_k^2).
The exact flow map integrates this velocity with an adaptive ODE solver (torchdiffeq).
"""
from __future__ import annotations

import math

import torch

from sgflow.interpolants import get_interpolant


class GaussianMixture:
    """A mixture of axis-aligned Gaussians in d dimensions.

    Args:
        means: [K, d]; stds: [K, d] or [K] or a float; weights: [K] (normalised here).
    """

    def __init__(self, means, stds=0.1, weights=None, interpolant="linear"):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(means.shape)}")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        stds = stds.reshape(k, 1).expand(k, d) if stds.dim() == 1 else stds.expand(k, d)
        if bool((stds <= 0).any()):
            raise ValueError("component stds must be positive")
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or bool((weights < 0).any()) or weights.sum() <= 0:
            raise ValueError("weights must be [K] non-negative with a positive sum")
        self.means, self.stds, self.weights = means, stds.clone(), weights / weights.sum()
        self.interpolant = get_interpolant(interpolant)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        """Draw n data points [n, d]."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[comp] + self.stds[comp] * z
        return x.to(dtype=dtype, device=device)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Data log density at x [n, d] -> [n]."""
        return self._log_marginal_terms(x.double(), torch.ones(x.shape[0], dtype=torch.float64)).logsumexp(1)

    def _log_marginal_terms(self, x, t):
        """log pi_k + log N(x; sigma_t mu_k, alpha_t^2 + sigma_t^2 s_k^2): [n, K]."""
        a = self.interpolant.alpha(t)[:, None, None]
        s = self.interpolant.sigma(t)[:, None, None]
        var = a**2 + s**2 * self.stds[None] ** 2  # [n, K, d]
        diff = x[:, None, :] - s * self.means[None]
        logn = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        return logn + torch.log(self.weights)[None]

    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Exact E[Xdot_t | X_t = x]. t: [n] or scalar; x: [n, d] -> [n, d] (computed in float64)."""
        dtype = x.dtype
        x = x.double()
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        ip = self.interpolant
        a, s = ip.alpha(t)[:, None, None], ip.sigma(t)[:, None, None]
        ad, sd = ip.alpha_dot(t)[:, None, None], ip.sigma_dot(t)[:, None, None]
        var_data = self.stds[None] ** 2
        c = (ad * a + sd * s * var_data) / (a**2 + s**2 * var_data)  # [n, K, d]
        cond = sd * self.means[None] + c * (x[:, None, :] - s * self.means[None])
        w = torch.softmax(self._log_marginal_terms(x, t), dim=1)  # [n, K]
        return (w[:, :, None] * cond).sum(1).to(dtype)

    def flow_map(self, t: float, u: float, x: torch.Tensor, rtol: float = 1e-8, atol: float = 1e-8) -> torch.Tensor:
        """Exact f(t, u, x): integrate dx/ds = velocity(s, x) from s=t to s=u (dopri5). x: [n, d]."""
        from sgflow._extras import require

        odeint = require("torchdiffeq", "the exact flow map of a mixture (an ODE solve)").odeint

        if not 0.0 <= t <= u <= 1.0:
            raise ValueError(f"need 0 <= t <= u <= 1, got t={t}, u={u}")
        if t == u:
            return x.clone()
        dtype = x.dtype
        ts = torch.tensor([t, u], dtype=torch.float64)
        path = odeint(lambda s, y: self.velocity(s, y), x.double(), ts, rtol=rtol, atol=atol, method="dopri5")
        return path[-1].to(dtype)

    def exact_model(self):
        """A callable ``model(t, u, x) -> f~`` implementing the exact flow map (for evaluation).

        Times must be equal within a batch for u != t (one ODE solve per call).
        """
        mix = self

        def model(t, u, x):
            if bool((t == u).all()):
                return mix.velocity(t, x)
            t0, u0 = float(t[0]), float(u[0])
            if not (bool((t == t0).all()) and bool((u == u0).all())):
                raise ValueError("exact_model needs one (t, u) pair per batch off the diagonal")
            return (mix.flow_map(t0, u0, x) - x) / (u0 - t0)

        return model


def gaussian_mixture_2d(name: str = "ring8", std: float = 0.08) -> GaussianMixture:
    """Named 2-D mixtures: ``ring8`` (8 modes on a circle of radius 1.5) and ``grid9`` (3x3 grid)."""
    if name == "ring8":
        ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        means = 1.5 * torch.stack([ang.cos(), ang.sin()], 1)
    elif name == "grid9":
        g = torch.tensor([-1.5, 0.0, 1.5], dtype=torch.float64)
        means = torch.cartesian_prod(g, g)
    else:
        raise ValueError(f"unknown 2-D mixture {name!r}; expected 'ring8' or 'grid9'")
    return GaussianMixture(means, std)


def random_mixture(dim: int, components: int, std: float = 0.3, seed: int = 0, scale: float = 2.0) -> GaussianMixture:
    """A random mixture in ``dim`` dimensions (means ~ scale * N(0, I) / sqrt(dim) * sqrt(dim))."""
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(components, dim, dtype=torch.float64, generator=g)
    weights = torch.rand(components, dtype=torch.float64, generator=g) + 0.5
    return GaussianMixture(means, std, weights)
