"""Synthetic point-cloud data: 2-D toy sets and Gaussian mixtures in any dimension.

Every sampler takes ``(n, generator=None)`` and returns a float32 tensor [n, 2] (or [n, d]); all
randomness comes from the given ``torch.Generator`` so that a training run's data stream is part of
its checkpointed RNG state. Nothing is downloaded.

The toy sets are scaled to roughly unit variance per coordinate (like the noise X_0 ~ N(0, I)) so
that one learning rate and network width work for all of them.
"""
from __future__ import annotations

import math

import torch

from sgflow.data.mixtures import GaussianMixture, gaussian_mixture_2d, random_mixture


def _check_n(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of samples must be a positive integer, got {n!r}")
    return n


def checkerboard(n: int, generator: torch.Generator | None = None, squares: int = 4, scale: float = 2.0) -> torch.Tensor:
    """Uniform on the "black" cells of a ``squares`` x ``squares`` board on [-scale, scale]^2.

    A cell (i, j) is black when i + j is even. Sampled exactly: pick a row cell, a column cell of the
    right parity, and a uniform point inside it. Returns [n, 2].
    """
    _check_n(n)
    if squares < 2:
        raise ValueError(f"checkerboard needs at least 2 squares per side, got {squares}")
    cell = 2 * scale / squares
    row = torch.randint(0, squares, (n,), generator=generator)
    # Columns with the parity of the row: i + j even.
    half = (squares - row % 2 + 1) // 2  # how many columns j in [0, squares) have j = row (mod 2)
    col = (torch.rand(n, generator=generator) * half).floor().long() * 2 + row % 2
    col = torch.minimum(col, torch.full_like(col, squares - 1))
    offset = torch.rand(n, 2, generator=generator)
    xy = torch.stack([col, row], 1).float() + offset
    return xy * cell - scale


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.08) -> torch.Tensor:
    """Two interleaved half circles (sklearn's ``make_moons`` layout), centred and scaled. [n, 2].

    Upper moon: (cos a, sin a), lower moon: (1 - cos a, 0.5 - sin a), a ~ U(0, pi), plus
    N(0, noise^2) jitter; then shifted by (-0.5, -0.25) and scaled by 1.6.
    """
    _check_n(n)
    a = torch.rand(n, generator=generator) * math.pi
    lower = torch.rand(n, generator=generator) < 0.5
    x = torch.where(lower, 1 - a.cos(), a.cos())
    y = torch.where(lower, 0.5 - a.sin(), a.sin())
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator)
    return (pts - torch.tensor([0.5, 0.25])) * 1.6


def spirals(n: int, generator: torch.Generator | None = None, arms: int = 2, turns: float = 1.5, noise: float = 0.05) -> torch.Tensor:
    """``arms`` interleaved Archimedean spirals r = 2 s, angle = 2 pi turns s + 2 pi k / arms. [n, 2].

    s ~ sqrt(U(0, 1)) so points are spread evenly along the arc length rather than piling up at
    the centre; N(0, noise^2) jitter.
    """
    _check_n(n)
    if arms < 1:
        raise ValueError(f"spirals needs at least one arm, got {arms}")
    s = torch.rand(n, generator=generator).sqrt()
    k = torch.randint(0, arms, (n,), generator=generator)
    ang = 2 * math.pi * turns * s + 2 * math.pi * k / arms
    r = 2.0 * s
    pts = torch.stack([r * ang.cos(), r * ang.sin()], 1)
    return pts + noise * torch.randn(n, 2, generator=generator)


TOY2D = {"checkerboard": checkerboard, "moons": two_moons, "spirals": spirals}


class PointDataset:
    """Infinite point-cloud data: ``sample(n, generator) -> [n, d]`` float32 on the CPU.

    Attributes:
        name: registry name; shape: per-sample shape ``(d,)``; is_image: False;
        mixture: the :class:`GaussianMixture` when the data is one (exact velocity / flow map for
            evaluation), else None; default_model: the network config that suits it ("mlp").
    """

    is_image = False
    default_model = "mlp"

    def __init__(self, name: str, sampler, dim: int, mixture: GaussianMixture | None = None, params: dict | None = None):
        self.name, self._sampler, self.shape, self.mixture = name, sampler, (dim,), mixture
        self.params = dict(params or {})

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` points [n, d] (float32, CPU)."""
        _check_n(n)
        return self._sampler(n, generator).float()

    def __repr__(self):
        extra = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"PointDataset({self.name!r}{', ' + extra if extra else ''})"


def mixture_dataset(name: str, mixture: GaussianMixture, params: dict | None = None) -> PointDataset:
    """Wrap a :class:`GaussianMixture` as a dataset; it keeps the mixture for exact evaluation."""
    return PointDataset(name, lambda n, g: mixture.sample(n, generator=g), mixture.dim, mixture, params)


def toy2d_dataset(name: str, **kw) -> PointDataset:
    """``ring8`` / ``grid9`` (Gaussian mixtures, kw: ``std``) or ``checkerboard`` / ``moons`` / ``spirals``
    (kw passed to the sampler, e.g. ``noise``)."""
    if name in ("ring8", "grid9"):
        std = float(kw.pop("std", 0.08))
        _no_extra(name, kw)
        return mixture_dataset(name, gaussian_mixture_2d(name, std=std), {"std": std})
    if name not in TOY2D:
        raise ValueError(f"unknown 2-D data set {name!r}")
    fn = TOY2D[name]
    try:
        fn(2, torch.Generator().manual_seed(0), **kw)  # validate the keyword arguments up front
    except TypeError as e:
        raise ValueError(f"bad options for data set {name!r}: {e}") from None
    return PointDataset(name, lambda n, g: fn(n, g, **kw), 2, None, kw)


def gmm_dataset(dim: int = 8, components: int = 8, std: float = 0.3, seed: int = 0, scale: float = 2.0) -> PointDataset:
    """A random Gaussian mixture in ``dim`` dimensions (:func:`random_mixture`); the mixture's own
    ``seed`` fixes the means and weights, independently of the training seed."""
    for key, val in (("dim", dim), ("components", components)):
        if int(val) != val or val < 1:
            raise ValueError(f"mixture {key} must be a positive integer, got {val!r}")
    if std <= 0:
        raise ValueError(f"mixture std must be positive, got {std}")
    mix = random_mixture(int(dim), int(components), std=float(std), seed=int(seed), scale=float(scale))
    params = {"dim": int(dim), "components": int(components), "std": float(std), "seed": int(seed), "scale": float(scale)}
    return mixture_dataset("gmm", mix, params)


def _no_extra(name, kw):
    if kw:
        raise ValueError(f"data set {name!r} got unexpected options: {sorted(kw)}")
