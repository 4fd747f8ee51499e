"""Interpolants X_t = alpha_t X_0 + sigma_t X_1 between noise X_0 (t=0) and data X_1 (t=1)."""
from __future__ import annotations

import math

import torch


class Interpolant:
    """Base class: subclasses define ``alpha``, ``sigma`` and their time derivatives.

    All methods take ``t`` of shape [B] and return [B]; :meth:`broadcast` reshapes to x's rank.
    """

    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_dot(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma_dot(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def broadcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B] -> [B, 1, ..., 1] matching ``x.dim()``."""
        return coef.reshape(coef.shape[0], *([1] * (x.dim() - 1)))

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor):
        """Return ``(X_t, Xdot_t)`` with X_t = alpha_t x0 + sigma_t x1, Xdot_t = alphadot_t x0 + sigmadot_t x1.

        x0 (noise), x1 (data): [B, *D]; t: [B].
        """
        b = lambda c: self.broadcast(c, x1)  # noqa: E731
        xt = b(self.alpha(t)) * x0 + b(self.sigma(t)) * x1
        xdot = b(self.alpha_dot(t)) * x0 + b(self.sigma_dot(t)) * x1
        return xt, xdot

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearInterpolant(Interpolant):
    """alpha_t = 1 - t, sigma_t = t (rectified flow / flow matching's default path)."""

    name = "linear"

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def alpha_dot(self, t):
        return -torch.ones_like(t)

    def sigma_dot(self, t):
        return torch.ones_like(t)


class TrigInterpolant(Interpolant):
    """alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2) (variance preserving)."""

    name = "trig"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def alpha_dot(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def sigma_dot(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


INTERPOLANTS = {"linear": LinearInterpolant, "trig": TrigInterpolant}


def get_interpolant(spec: "str | Interpolant") -> Interpolant:
    """Return an :class:`Interpolant` from a name (``"linear"``, ``"trig"``) or pass one through."""
    if isinstance(spec, Interpolant):
        return spec
    if isinstance(spec, str) and spec.lower() in INTERPOLANTS:
        return INTERPOLANTS[spec.lower()]()
    raise ValueError(f"unknown interpolant {spec!r}; expected one of {sorted(INTERPOLANTS)} or an Interpolant")
