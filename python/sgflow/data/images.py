"""Image data held in memory as uint8 [N, C, H, W] and served as float [-1, 1] batches.

- ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, shipped with scikit-learn, no
  download), optionally zero-padded and/or resized.
- ``cifar10``: the CIFAR-10 training set from a local ``root`` through torchvision (never
  downloads; torchvision is imported only here).
- ``folder``: every image file under a directory (recursively), read with Pillow, centre-cropped to a
  square and resized to ``size``.

Batches are drawn with replacement by ``torch.randint(..., generator=...)`` so the whole data stream is
a function of the generator state that the trainer checkpoints (no DataLoader worker RNG to restore).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageDataset:
    """A finite image set. ``sample(n, generator) -> [n, C, H, W]`` float32 in [-1, 1] on the CPU.

    Args:
        images: uint8 [N, C, H, W] (0..255) or float [N, C, H, W] already in [-1, 1].
        labels: optional int64 [N].
        hflip: randomly mirror images left-right (data augmentation; off for digits, where a
            mirrored digit is not a digit).
    """

    is_image = True
    mixture = None

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor | None = None, hflip: bool = False,
                 default_model: str = "tiny", params: dict | None = None):
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty image tensor [N, C, H, W], got {tuple(images.shape)}")
        self.name, self.images, self.labels, self.hflip = name, images, labels, bool(hflip)
        self.default_model = default_model
        self.params = dict(params or {})

    @property
    def shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return x.float() / 127.5 - 1.0
        return x.float()

    def all(self) -> torch.Tensor:
        """The whole set as float [N, C, H, W] in [-1, 1] (no augmentation)."""
        return self._to_float(self.images)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` images with replacement, [n, C, H, W] in [-1, 1]."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"number of samples must be a positive integer, got {n!r}")
        idx = torch.randint(0, len(self), (n,), generator=generator)
        x = self._to_float(self.images[idx])
        if self.hflip:
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def __repr__(self):
        return f"ImageDataset({self.name!r}, n={len(self)}, shape={self.shape})"


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of float [N, C, H, W] to size x size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def digits_dataset(pad: int = 0, size: int | None = None) -> ImageDataset:
    """scikit-learn's digits: 1797 grayscale 8x8 images with values 0..16 scaled to [-1, 1].

    Args:
        pad: zero-pad (with the background value -1) this many pixels on every side first,
            e.g. ``pad=4`` -> 16x16 with the digit in the middle.
        size: then resize (bilinear) to ``size`` x ``size``, e.g. 16 or 32 for U-Nets that downsample.

    Returns an :class:`ImageDataset` of shape (1, 8 + 2 pad, ...) or (1, size, size), with labels.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from None
    if int(pad) != pad or pad < 0:
        raise ValueError(f"digits pad must be a non-negative integer, got {pad!r}")
    if size is not None and (int(size) != size or size < 2):
        raise ValueError(f"digits size must be an integer >= 2, got {size!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0  # [1797, 1, 8, 8]
    if pad:
        x = F.pad(x, (pad,) * 4, value=-1.0)
    if size is not None:
        x = _resize(x, int(size)).clamp(-1, 1)
    labels = torch.tensor(d.target, dtype=torch.long)
    return ImageDataset("digits", x.contiguous(), labels, hflip=False, default_model="digits",
                        params={"pad": int(pad), "size": None if size is None else int(size)})


def _need_dir(path, what: str) -> Path:
    if path is None:
        raise ValueError(f"the {what} data set needs a directory: pass root=/path/to/data (CLI: --data-root)")
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{what} data directory not found: {p}")
    if not p.is_dir():
        raise NotADirectoryError(f"{what} data path is not a directory: {p}")
    return p


def cifar10_dataset(root=None, hflip: bool = True, train: bool = True) -> ImageDataset:
    """CIFAR-10 (50000 training images, 3x32x32) from a local copy through torchvision.

    ``root`` is the directory that holds ``cifar-10-batches-py`` (torchvision's layout). Never
    downloads: get the data once with ``torchvision.datasets.CIFAR10(root, download=True)``.
    """
    p = _need_dir(root, "cifar10")
    try:
        import torchvision
    except ImportError:
        raise ImportError("the 'cifar10' data set needs torchvision: pip install torchvision") from None
    try:
        ds = torchvision.datasets.CIFAR10(str(p), train=train, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"no CIFAR-10 under {p} (expected {p / 'cifar-10-batches-py'}): {e}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, 32, 32]
    labels = torch.tensor(ds.targets, dtype=torch.long)
    return ImageDataset("cifar10", images, labels, hflip=hflip, default_model="cifar10",
                        params={"root": str(p), "hflip": bool(hflip)})


def folder_dataset(root=None, size: int = 32, channels: int = 3, hflip: bool = True, max_images: int | None = None) -> ImageDataset:
    """All images under ``root`` (recursively), centre-cropped to squares and resized to ``size``.

    Read with Pillow (no torchvision needed) and held in memory as uint8: fine for up to a few
    hundred thousand small images. ``channels`` is 3 (RGB) or 1 (grayscale).
    """
    from sgflow._extras import require

    Image = require("PIL.Image", "the 'folder' data set (reads images with Pillow)")

    p = _need_dir(root, "folder")
    if channels not in (1, 3):
        raise ValueError(f"folder channels must be 1 or 3, got {channels}")
    if int(size) != size or size < 2:
        raise ValueError(f"folder image size must be an integer >= 2, got {size!r}")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if max_images is not None:
        files = files[: int(max_images)]
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {p}")
    out = torch.empty(len(files), channels, size, size, dtype=torch.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB" if channels == 3 else "L")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((size, size), Image.Resampling.BICUBIC)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, channels)
        except OSError as e:
            raise ValueError(f"cannot read image {f}: {e}") from None
        out[i] = t.permute(2, 0, 1)
    return ImageDataset("folder", out, None, hflip=hflip, default_model="cifar10" if size >= 32 else "tiny",
                        params={"root": str(p), "size": int(size), "channels": channels, "hflip": bool(hflip)})
