"""Data sets, registry, metrics extensions and PNG plotting."""
import importlib.util
import math

import pytest
import torch
from PIL import Image

from sgflow.data import DATASETS, DatasetError, get_dataset
from sgflow.metrics import energy_distance, frechet_distance, gaussian_frechet_distance, sliced_wasserstein
from sgflow.plotting import image_grid, samples_figure, save_png, scatter_panels

POINT_SETS = ["ring8", "grid9", "checkerboard", "moons", "spirals", "gmm"]


@pytest.mark.parametrize("name", POINT_SETS)
def test_point_sets_shape_scale_and_determinism(name):
    ds = get_dataset(name)
    a = ds.sample(3000, generator=torch.Generator().manual_seed(3))
    b = ds.sample(3000, generator=torch.Generator().manual_seed(3))
    c = ds.sample(3000, generator=torch.Generator().manual_seed(4))
    assert a.shape == (3000, *ds.shape) and a.dtype == torch.float32
    assert torch.equal(a, b), "same generator state must give the same data"
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all()
    if name != "gmm":
        assert ds.shape == (2,)
        std = a.std(0)
        assert ((std > 0.5) & (std < 2.0)).all(), f"{name} should be roughly unit scale, std={std}"
    assert (ds.mixture is not None) == (name in ("ring8", "grid9", "gmm"))
    assert not ds.is_image and ds.default_model == "mlp"


def test_checkerboard_only_black_cells():
    x = get_dataset("checkerboard").sample(20000, generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 2.0
    cell = ((x + 2) / 1.0).floor().long().clamp(0, 3)  # 4 cells of width 1 on [-2, 2]
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)
    black = counts[counts > 0]
    assert black.numel() == 8 and (black.float() / black.sum()).sub(1 / 8).abs().max() < 0.02


def test_gmm_options_and_exact_flow_map():
    ds = get_dataset("gmm", dim=5, components=3, std=0.4, seed=2)
    assert ds.shape == (5,) and ds.mixture.means.shape == (3, 5)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = ds.mixture.flow_map(0.0, 1.0, x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    with pytest.raises(DatasetError, match="dim"):
        get_dataset("gmm", dim=0)


def test_digits():
    ds = get_dataset("digits")
    assert ds.shape == (1, 8, 8) and ds.is_image and len(ds) == 1797
    x = ds.sample(64, generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and x.max() > 0.9
    assert ds.labels.shape == (1797,) and set(ds.labels.tolist()) == set(range(10))
    padded = get_dataset("digits", pad=4)
    assert padded.shape == (1, 16, 16)
    assert torch.equal(padded.all()[:, :, :4], torch.full((1797, 1, 4, 16), -1.0))
    assert get_dataset("digits", size=32).shape == (1, 32, 32)
    with pytest.raises(DatasetError, match="pad"):
        get_dataset("digits", pad=-1)


def test_registry_errors():
    with pytest.raises(DatasetError, match="unknown data set 'nope'.*ring8"):
        get_dataset("nope")
    with pytest.raises(DatasetError, match="moons"):
        get_dataset("moons", bogus=1)
    with pytest.raises(DatasetError, match="ring8"):
        get_dataset("ring8", bogus=1)
    with pytest.raises(FileNotFoundError, match="not found"):
        get_dataset("cifar10", root="/definitely/not/here")
    with pytest.raises(DatasetError, match="root"):
        get_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="not found"):
        get_dataset("folder", root="/definitely/not/here")
    assert set(DATASETS) >= {"ring8", "grid9", "checkerboard", "moons", "spirals", "gmm", "digits", "cifar10", "folder"}


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_cifar10_without_torchvision_says_what_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install torchvision"):
        get_dataset("cifar10", root=str(tmp_path))


def test_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(5):
        Image.new("RGB", (20 + i, 12), (50 * i, 10, 200)).save(tmp_path / ("sub" if i % 2 else ".") / f"im{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = get_dataset("folder", root=str(tmp_path), size=8)
    assert ds.shape == (3, 8, 8) and len(ds) == 5
    x = ds.sample(10, generator=torch.Generator().manual_seed(0))
    assert x.shape == (10, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    gray = get_dataset("folder", root=str(tmp_path), size=6, channels=1)
    assert gray.shape == (1, 6, 6)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        get_dataset("folder", root=str(empty))


def test_frechet_distance_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([1.0, -1.0])
    c1, c2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([9.0, 1.0]))
    # Diagonal covariances: ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2.
    exact = 1 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert gaussian_frechet_distance(mu1, c1, mu2, c2).item() == pytest.approx(exact, rel=1e-10)
    a = torch.randn(20000, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0]) + mu1
    b = torch.randn(20000, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0]) + mu2
    assert frechet_distance(a, b).item() == pytest.approx(exact, rel=0.05)
    assert frechet_distance(a, a).item() == pytest.approx(0.0, abs=1e-8)


def test_energy_and_sliced_distances_unchanged():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    assert abs(energy_distance(x, y).item()) < 0.02
    assert energy_distance(x, y + 2).item() > 1.0
    assert sliced_wasserstein(x, y + 2, generator=torch.Generator().manual_seed(0)).item() > 1.0


def test_plots_are_pngs(tmp_path):
    g = torch.Generator().manual_seed(0)
    pts = get_dataset("ring8").sample(500, generator=g)
    img = scatter_panels([("data", pts), ("model", pts + 0.1 * torch.randn(500, 2, generator=g))], title="t",
                         footers=["a", "b"])
    assert img.mode == "RGB" and img.width > 2 * 256
    grid = image_grid(torch.rand(10, 1, 8, 8) * 2 - 1, nrow=5, scale=2)
    assert grid.size == (2 * (5 * 9 + 1), 2 * (2 * 9 + 1))
    digits = get_dataset("digits").sample(16, generator=g)
    fig = samples_figure(digits, {1: digits, 4: digits}, title="digits")
    path = save_png(fig, tmp_path / "deep" / "fig.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == fig.size
    # NaN/inf points (a diverged model) must not break the plot.
    bad = pts.clone()
    bad[:10] = math.nan
    scatter_panels([("data", pts), ("bad", bad)])
