"""Data sets and their registry.

``get_dataset(name, **kw)`` returns an object with

- ``sample(n, generator=None) -> Tensor [n, *shape]`` (float32, CPU; all randomness from ``generator``),
- ``shape`` (per-sample shape), ``is_image``, ``default_model`` (a network config name),
- ``mixture``: the :class:`GaussianMixture` (exact velocity and flow map) for mixture data, else None,
- ``params``: the options it was built with (so a checkpoint can rebuild it).

Names: ``ring8``, ``grid9`` (2-D Gaussian mixtures), ``checkerboard``, ``moons``, ``spirals`` (2-D),
``gmm`` (random Gaussian mixture in ``dim`` dimensions), ``digits`` (scikit-learn 8x8 digits),
``cifar10`` and ``folder`` (local files; ``root=...``).
"""
from __future__ import annotations

from sgflow.data.images import ImageDataset, cifar10_dataset, digits_dataset, folder_dataset
from sgflow.data.mixtures import GaussianMixture, gaussian_mixture_2d, random_mixture
from sgflow.data.toy2d import PointDataset, checkerboard, gmm_dataset, spirals, toy2d_dataset, two_moons


class DatasetError(ValueError):
    """A user-facing problem with a data set name or its options."""


def _toy(name):
    return lambda **kw: toy2d_dataset(name, **kw)


DATASETS = {
    "ring8": _toy("ring8"),
    "grid9": _toy("grid9"),
    "checkerboard": _toy("checkerboard"),
    "moons": _toy("moons"),
    "spirals": _toy("spirals"),
    "gmm": gmm_dataset,
    "digits": digits_dataset,
    "cifar10": cifar10_dataset,
    "folder": folder_dataset,
}

DESCRIPTIONS = {
    "ring8": "2-D: 8 Gaussians on a circle (exact flow map available)",
    "grid9": "2-D: 3x3 grid of Gaussians (exact flow map available)",
    "checkerboard": "2-D: uniform on a 4x4 checkerboard",
    "moons": "2-D: two moons",
    "spirals": "2-D: two spirals",
    "gmm": "random Gaussian mixture in dim dimensions (options dim, components, std, seed; exact flow map)",
    "digits": "scikit-learn 8x8 digits in [-1, 1] (options pad, size)",
    "cifar10": "CIFAR-10 train set from --data-root via torchvision (no download)",
    "folder": "all images under --data-root, resized to size (options size, channels)",
}


def get_dataset(name: str, **kw):
    """Build the data set ``name`` with options ``kw``; unknown names or options raise DatasetError.

    A missing directory raises FileNotFoundError, a missing optional package ImportError, both with
    a message that says what to do.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown data set {name!r}; expected one of: {', '.join(DATASETS)}")
    try:
        return DATASETS[name](**kw)
    except TypeError as e:
        raise DatasetError(f"bad options for data set {name!r}: {e}") from None
    except ValueError as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(str(e)) from None


__all__ = [
    "get_dataset", "DATASETS", "DESCRIPTIONS", "DatasetError", "GaussianMixture", "gaussian_mixture_2d",
    "random_mixture", "PointDataset", "ImageDataset", "checkerboard", "two_moons", "spirals",
    "digits_dataset", "cifar10_dataset", "folder_dataset", "gmm_dataset", "toy2d_dataset",
]
