"""sgflow.plotting: matplotlib (Agg) figures as RGB images and PNG files of the expected size, densities drawn
where the points are, image grids laid out like torchvision's make_grid, odd and bad inputs, no pyplot state."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sgflow.plotting import (
    MODEL_COLOR,
    auto_limit,
    density_image,
    image_grid,
    image_panels,
    panel_row,
    samples_figure,
    save_png,
    scatter_panels,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    yield
    assert plt.get_fignums() == [], "a plotting function left a pyplot figure open"
    assert matplotlib.get_backend() == backend, "a plotting function switched matplotlib's backend"


def _ink(arr: np.ndarray) -> np.ndarray:
    """bool [H, W]: coloured pixels (not white, not the grey of axes, frames and text)."""
    a = arr.astype(int)
    return (a.max(-1) - a.min(-1)) > 30


def _write(img, path):
    path = save_png(img, path)
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == img.size
    return path


def test_density_is_where_the_points_are(tmp_path):
    g = torch.Generator().manual_seed(0)
    pts = 0.3 * torch.randn(3000, 2, generator=g) + torch.tensor([1.2, 1.2])  # upper-right quadrant
    img = density_image(pts, lim=2.5, size=200, color=MODEL_COLOR)
    assert img.mode == "RGB" and img.size == (200, 200)
    ink = _ink(np.asarray(img))
    quads = {"upper right": ink[:100, 100:], "upper left": ink[:100, :100], "lower left": ink[100:, :100],
             "lower right": ink[100:, 100:]}
    counts = {k: int(v.sum()) for k, v in quads.items()}
    assert counts["upper right"] > 2000, counts
    assert counts["upper right"] > 20 * max(counts["upper left"], counts["lower left"], counts["lower right"], 1), counts
    # Darkest where the points are densest (around (1.2, 1.2), i.e. pixel (x, y) ~ (148, 52)).
    lum = np.asarray(img).astype(float).mean(-1)
    assert lum[40:64, 136:160].mean() < lum[:100, 100:].mean() < 250
    # The model colour, not the data colour: orange has more red than blue.
    mean_ink = np.asarray(img)[ink].mean(0)
    assert mean_ink[0] > mean_ink[2]
    _write(img, tmp_path / "density.png")


def test_scatter_panels_size_colours_and_panels(tmp_path):
    g = torch.Generator().manual_seed(1)
    left = 0.2 * torch.randn(1000, 2, generator=g) - 1.0  # lower left
    right = 0.2 * torch.randn(1000, 2, generator=g) + 1.0  # upper right
    img = scatter_panels([("data", left), ("model", right), ("one point", torch.tensor([[1.0, -1.0]]))], lim=2.0,
                         size=128, title="a title", footers=["ED 0.1", "ED 0.2", ""])
    assert img.mode == "RGB"
    assert img.width == 2 * 14 + 3 * 128 + 2 * 14 and 128 < img.height < 128 + 120
    arr = np.asarray(img)
    ink = _ink(arr)
    cols = [slice(14 + i * (128 + 14), 14 + i * (128 + 14) + 128) for i in range(3)]
    # Each panel's ink lies in its own half: the data cloud at the lower left in blue, the model's upper right
    # in orange, the single point in the lower right.
    ys, xs = np.nonzero(ink[:, cols[0]])
    assert len(xs) > 200 and xs.mean() < 64
    assert arr[:, cols[0]][ink[:, cols[0]]].mean(0)[2] > arr[:, cols[0]][ink[:, cols[0]]].mean(0)[0]  # blue
    ys2, xs2 = np.nonzero(ink[:, cols[1]])
    assert len(xs2) > 200 and xs2.mean() > 64 and ys2.mean() < ys.mean() - 40  # y up: +1 is 64 px above -1
    assert arr[:, cols[1]][ink[:, cols[1]]].mean(0)[0] > arr[:, cols[1]][ink[:, cols[1]]].mean(0)[2]  # orange
    ys3, xs3 = np.nonzero(ink[:, cols[2]])
    assert 0 < len(xs3) < 200 and xs3.mean() > 64
    _write(img, tmp_path / "deep" / "scatter.png")


def test_odd_point_clouds():
    one = torch.tensor([[0.5, 0.5]])
    img = scatter_panels([("one", one)])
    assert _ink(np.asarray(img)).sum() > 0  # a single point is visible
    bad = torch.randn(200, 2)
    bad[:10] = math.nan
    bad[10:20] = math.inf
    scatter_panels([("data", torch.randn(200, 2)), ("diverged", bad)])  # NaN / inf points are skipped
    scatter_panels([("all nan", torch.full((5, 2), math.nan))])
    scatter_panels([("empty", torch.zeros(0, 2))])
    assert auto_limit(torch.full((3, 2), math.nan)) == 1.0
    assert auto_limit(torch.zeros(0, 2)) == 1.0
    scatter_panels([("3-d points, first two coordinates", torch.randn(50, 3))])


def _reference_grid(images, nrow, pad, pad_value=255):
    """The layout of the former hand-written loop (and of torchvision.utils.make_grid)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((3, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("n,c,h,w,nrow,pad", [(10, 1, 8, 8, 5, 1), (3, 3, 7, 5, None, 1), (1, 1, 7, 5, None, 1),
                                              (5, 3, 4, 6, 2, 0), (7, 1, 3, 3, 3, 2)])
def test_image_grid_layout(n, c, h, w, nrow, pad):
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, c, h, w, generator=g) * 2 - 1
    k = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / k)
    img = image_grid(x, nrow=nrow, pad=pad)
    assert img.mode == "RGB" and img.size == (k * (w + pad) + pad, rows * (h + pad) + pad)
    np.testing.assert_array_equal(np.asarray(img), _reference_grid(x, k, pad))
    big = image_grid(x, nrow=nrow, pad=pad, scale=3)
    assert big.size == (3 * img.width, 3 * img.height)
    np.testing.assert_array_equal(np.asarray(big)[::3, ::3], np.asarray(img))


def test_image_figures(tmp_path):
    g = torch.Generator().manual_seed(2)
    odd = torch.rand(6, 3, 7, 5, generator=g) * 2 - 1
    fig = samples_figure(odd, {1: odd, 4: odd.flip(0)}, title="7x5 images", footers=["a", "b", "c"])
    grid = image_grid(odd)  # 3 x 2 tiles of 5 x 7: 19 x 17 px, scaled to ~220 px
    scale = round(220 / grid.width)
    assert fig.width == 2 * 14 + 3 * scale * grid.width + 2 * 14 and fig.height > scale * grid.height
    _write(fig, tmp_path / "odd.png")
    single = samples_figure(odd[:1], {1: odd[:1]})  # batch 1
    assert single.width == 2 * 14 + 2 * round(220 / 7) * 7 + 14
    _write(single, tmp_path / "single.png")
    panels = image_panels([("a", odd), ("b", odd)], scale=2)
    assert panels.width == 2 * 14 + 2 * 2 * grid.width + 14


def test_panel_row_shows_images_at_one_to_one():
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    img = panel_row([("red", red), ("", Image.new("RGB", (20, 50), (0, 0, 255)))], title="t", footers=["f", None])
    arr = np.asarray(img).astype(int)
    is_red = (arr[..., 0] > 240) & (arr[..., 1] < 15) & (arr[..., 2] < 15)
    is_blue = (arr[..., 2] > 240) & (arr[..., 0] < 15) & (arr[..., 1] < 15)
    # The frame (1 px) may cover the edge pixels; no resampling to another size.
    assert 38 * 28 <= is_red.sum() <= 40 * 30
    assert 18 * 48 <= is_blue.sum() <= 20 * 50
    assert img.width == 2 * 14 + 40 + 14 + 20


def test_save_png_accepts_a_matplotlib_figure(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1), dpi=50)
    fig.add_subplot().plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "sub" / "curve.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (100, 50)


@pytest.mark.parametrize("call,match", [
    (lambda: density_image(torch.zeros(5, 3), lim=1.0), r"density_image needs points \[n, 2\], got shape \(5, 3\)"),
    (lambda: density_image(torch.zeros(5), lim=1.0), r"needs points \[n, 2\]"),
    (lambda: scatter_panels([("x", torch.zeros(5))]), r"scatter_panels needs points \[n, 2\], got shape \(5,\)"),
    (lambda: scatter_panels([("x", torch.zeros(5, 1))]), r"needs points \[n, 2\], got shape \(5, 1\)"),
    (lambda: image_grid(torch.zeros(2, 8, 8)), r"image_grid needs images \[n, 1 or 3, H, W\], got \(2, 8, 8\)"),
    (lambda: image_grid(torch.zeros(2, 2, 8, 8)), r"\[n, 1 or 3, H, W\]"),
    (lambda: image_grid(torch.zeros(0, 1, 8, 8)), "at least one image"),
    (lambda: samples_figure(torch.zeros(4, 8, 8), {}), r"points \[n, d\] or images \[n, C, H, W\]"),
    (lambda: scatter_panels([]), "at least one panel"),
], ids=["density-3cols", "density-1d", "scatter-1d", "scatter-1col", "grid-3d", "grid-2ch", "grid-empty",
        "samples-3d", "no-panels"])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
