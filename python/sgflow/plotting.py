"""PNG figures drawn with matplotlib (Agg, off screen): 2-D point clouds as density plots, image grids, and
rows of titled panels.

Every figure is a :class:`matplotlib.figure.Figure` rendered by its own ``FigureCanvasAgg``; pyplot and
``matplotlib.use`` are never touched, so nothing here changes the caller's backend or leaves figures open.
The functions return the rendered pixels as an RGB :class:`PIL.Image.Image` (exact pixel sizes, which the
layout below fixes), and :func:`save_png` writes them.

Point clouds are drawn as a 2-D histogram (``numpy.histogram2d`` shown with ``imshow``) on a logarithmic
colour scale from a light tint (one point) to the full colour (the densest bin), so dense modes look dense
and single points stay visible, which a plain dot scatter of thousands of points does not show. Empty bins
are transparent over faint axes through the origin.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap, LogNorm
    from matplotlib.figure import Figure
    from PIL import Image
except ImportError as _exc:  # the app's extra: sgflow's core needs neither
    from sgflow._extras import missing_message

    raise ImportError(missing_message(_exc.name or "matplotlib", "sgflow.plotting (figures)")) from _exc

DATA_COLOR = (40, 90, 170)
MODEL_COLOR = (215, 80, 40)
BACKGROUND = (255, 255, 255)

DPI = 100
TITLE_PT, CAPTION_PT, FOOTER_PT = 13, 11, 10


def _rgb01(color) -> tuple:
    """An (r, g, b) colour in 0..255 as matplotlib's 0..1 floats (strings pass through)."""
    if isinstance(color, str):
        return color
    return tuple(c / 255.0 for c in color)


def _text_px(points: float, lines: int = 1) -> int:
    """Pixels a line of text of ``points`` takes at :data:`DPI`, with matplotlib's line spacing."""
    return int(math.ceil(points * DPI / 72 * 1.25 * lines))


def auto_limit(*clouds: torch.Tensor, quantile: float = 0.995, margin: float = 1.15) -> float:
    """A symmetric half-width for axes: the ``quantile`` of |coordinates| over all clouds, padded."""
    vals = [c.detach().double().abs().flatten() for c in clouds if c.numel()]
    vals = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)
    vals = vals[torch.isfinite(vals)]
    if vals.numel() == 0:
        return 1.0
    q = torch.quantile(vals[:1_000_000], quantile).item()
    return max(q * margin, 1e-3)


def _check_points(points, who: str) -> np.ndarray:
    if not torch.is_tensor(points):
        points = torch.as_tensor(points)
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"{who} needs points [n, 2], got shape {tuple(points.shape)}")
    return points.detach().double().cpu().numpy()


def _density(ax, pts: np.ndarray, lim: float, color, bins: int | None = None) -> None:
    """Draw points [n, 2] (numpy) into ``ax`` as a log-scaled 2-D histogram over [-lim, lim]^2 (y up)."""
    pts = pts[np.isfinite(pts).all(axis=1)]
    n = len(pts)
    if bins is None:
        size = ax.bbox.width  # bins of about 2-8 pixels: finer with more points
        bins = int(np.clip(2 * math.sqrt(max(n, 1)), 32, max(size / 2, 32)))
    counts, _, _ = np.histogram2d(pts[:, 0], pts[:, 1], bins=bins, range=[[-lim, lim], [-lim, lim]])
    rgb = np.array(_rgb01(color))
    tint = 1 - 0.35 * (1 - rgb)  # one point: a third of the way from white to the colour
    cmap = LinearSegmentedColormap.from_list("sgflow_density", [tuple(tint), tuple(rgb)])
    ax.axhline(0, color="#e4e4e4", lw=0.8, zorder=0)
    ax.axvline(0, color="#e4e4e4", lw=0.8, zorder=0)
    ax.imshow(np.ma.masked_equal(counts.T, 0), origin="lower", extent=(-lim, lim, -lim, lim), cmap=cmap,
              norm=LogNorm(vmin=1, vmax=max(2.0, counts.max())), interpolation="nearest", aspect="auto", zorder=1)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)


def _panel_figure(sizes: list, title: str | None = None, captions: list | None = None, footers: list | None = None,
                  gap: int = 14, margin: int = 14) -> tuple:
    """A white figure with one axes per ``(width, height)`` in ``sizes`` (pixels), side by side, each with its
    caption as the axes title and its footer as the x label, and ``title`` over all.

    The axes are exactly the given pixel sizes (so an image shown in one is not resampled). Returns
    ``(figure, [axes])``; the figure is ``2 margin + sum(widths) + gap (n - 1)`` pixels wide.
    """
    if not sizes:
        raise ValueError("a figure needs at least one panel")
    captions = list(captions) if captions else [None] * len(sizes)
    footers = list(footers) if footers else []
    cap_h = _text_px(CAPTION_PT) + 6 if any(captions) else 0
    foot_h = _text_px(FOOTER_PT) + 6 if any(footers) else 0
    title_lines = title.count("\n") + 1 if title else 0
    title_h = _text_px(TITLE_PT, title_lines) + 10 if title else 0
    width = 2 * margin + sum(w for w, _ in sizes) + gap * (len(sizes) - 1)
    height = 2 * margin + title_h + cap_h + max(h for _, h in sizes) + foot_h
    # A hair over the size: Agg truncates the figure's size in pixels, and w / DPI * DPI may fall just short.
    fig = Figure(figsize=((width + 0.01) / DPI, (height + 0.01) / DPI), dpi=DPI, facecolor=_rgb01(BACKGROUND))
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, x=0.5, y=1 - margin / height, va="top", fontsize=TITLE_PT, color="#141414")
    axes, x = [], margin
    top = margin + title_h + cap_h  # pixels from the top to the panels' upper edge
    for i, (w, h) in enumerate(sizes):
        ax = fig.add_axes((x / width, 1 - (top + h) / height, w / width, h / height))
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("#aaaaaa")
        if captions[i]:
            ax.set_title(captions[i], fontsize=CAPTION_PT, color="#282828", pad=4)
        if i < len(footers) and footers[i]:
            ax.set_xlabel(footers[i], fontsize=FOOTER_PT, color="#5a5a5a", labelpad=3)
        axes.append(ax)
        x += w + gap
    return fig, axes


def _render(fig: Figure) -> Image.Image:
    """The figure's pixels as an RGB image of exactly its (whole-pixel) size."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    w, h = (int(round(v)) for v in fig.bbox.size)
    return Image.fromarray(np.ascontiguousarray(rgba[:h, :w, :3]))


def density_image(points: torch.Tensor, lim: float, size: int = 256, color=MODEL_COLOR, bins: int | None = None,
                  background=BACKGROUND) -> Image.Image:
    """Render points [n, 2] within [-lim, lim]^2 as a ``size`` x ``size`` RGB density plot (y up)."""
    pts = _check_points(points, "density_image")
    fig = Figure(figsize=((size + 0.01) / DPI, (size + 0.01) / DPI), dpi=DPI, facecolor=_rgb01(background))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_facecolor(_rgb01(background))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#aaaaaa")
    _density(ax, pts, lim, color, bins)
    return _render(fig)


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1, pad_value: int = 255) -> Image.Image:
    """Tile images [n, C, H, W] with values in [-1, 1] (C = 1 or 3) into one RGB image.

    ``nrow`` images per row (default ceil(sqrt(n))), ``pad`` pixels of ``pad_value`` around each (the layout
    of ``torchvision.utils.make_grid``: (H + pad) rows + pad); ``scale`` enlarges pixels (nearest) so 8x8
    digits are visible. Built with torch reshapes (torchvision is not a dependency).
    """
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"image_grid needs images [n, 1 or 3, H, W], got {shape}")
    if images.shape[0] == 0:
        raise ValueError("image_grid needs at least one image, got 0")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    nrow = max(1, min(nrow or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / nrow)
    # Pad every image on its top and left, fill the last row with blank tiles, then lay the tiles out
    # [rows, nrow, 3, H + pad, W + pad] -> [3, rows (H + pad), nrow (W + pad)] and close the bottom/right edge.
    x = torch.nn.functional.pad(x, (pad, 0, pad, 0), value=pad_value)
    blank = torch.full((rows * nrow - n, 3, h + pad, w + pad), pad_value, dtype=torch.uint8)
    x = torch.cat([x, blank]).reshape(rows, nrow, 3, h + pad, w + pad)
    grid = x.permute(2, 0, 3, 1, 4).reshape(3, rows * (h + pad), nrow * (w + pad))
    grid = torch.nn.functional.pad(grid, (0, pad, 0, pad), value=pad_value)
    if scale > 1:
        grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())


def panel_row(panels: list, title: str | None = None, footers: list | None = None, gap: int = 14,
              margin: int = 14) -> Image.Image:
    """Place ``[(caption, PIL.Image), ...]`` side by side at 1:1 pixel scale with captions above, an optional
    figure title on top and optional one-line footers under each panel."""
    fig, axes = _panel_figure([im.size for _, im in panels], title=title, captions=[c for c, _ in panels],
                              footers=footers, gap=gap, margin=margin)
    for ax, (_, im) in zip(axes, panels):
        ax.imshow(np.asarray(im.convert("RGB")), interpolation="nearest", aspect="auto")
    return _render(fig)


def scatter_panels(clouds: list, lim: float | None = None, size: int = 256, title: str | None = None,
                   footers: list | None = None, colors: list | None = None) -> Image.Image:
    """A row of density plots on shared axes: ``clouds = [(caption, points [n, 2]), ...]``.

    The first cloud is drawn in the data colour, the rest in the model colour (unless ``colors``).
    """
    pts = [_check_points(p[:, :2] if torch.is_tensor(p) and p.dim() == 2 else p, "scatter_panels") for _, p in clouds]
    if lim is None:
        lim = auto_limit(*[torch.from_numpy(p) for p in pts])
    if colors is None:
        colors = [DATA_COLOR] + [MODEL_COLOR] * (len(clouds) - 1)
    fig, axes = _panel_figure([(size, size)] * len(clouds), title=title, captions=[c for c, _ in clouds], footers=footers)
    for ax, p, col in zip(axes, pts, colors):
        _density(ax, p, lim, col)
    return _render(fig)


def image_panels(grids: list, title: str | None = None, footers: list | None = None, nrow: int | None = None,
                 scale: int | None = None) -> Image.Image:
    """A row of image grids: ``grids = [(caption, images [n, C, H, W] in [-1, 1]), ...]``."""
    tiles = [(cap, image_grid(x, nrow=nrow, scale=1)) for cap, x in grids]
    if scale is None:
        # Aim at grids about 220 px wide so tiny images (8x8 digits) are legible.
        scale = max(1, round(220 / tiles[0][1].width))
    if scale > 1:
        tiles = [(cap, im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)) for cap, im in tiles]
    return panel_row(tiles, title=title, footers=footers)


def samples_figure(data: torch.Tensor, samples: dict, title: str | None = None, footers: list | None = None,
                   max_images: int = 64, lim: float | None = None) -> Image.Image:
    """Data beside model samples for several step counts ``samples = {steps: tensor}``.

    Points ([n, d], plotted in the first two coordinates) give density plots; images ([n, C, H, W]) give grids.
    """
    def caption(k):
        return f"{k} step" + ("s" if k != 1 else "")

    if data.dim() == 2:
        clouds = [("data", data)] + [(caption(k), s) for k, s in samples.items()]
        if lim is None:
            lim = auto_limit(data[:, :2])
        return scatter_panels([(c, p[:, :2]) for c, p in clouds], lim=lim, title=title, footers=footers)
    if data.dim() != 4:
        raise ValueError(f"samples_figure needs points [n, d] or images [n, C, H, W], got shape {tuple(data.shape)}")
    grids = [("data", data[:max_images])] + [(caption(k), s[:max_images]) for k, s in samples.items()]
    return image_panels(grids, title=title, footers=footers)


def save_png(img, path) -> Path:
    """Write ``img`` (a PIL image from this module, or a matplotlib Figure) to ``path`` as PNG, creating
    parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(img, Figure):
        img.savefig(path, format="png", dpi=img.dpi)
    else:
        img.save(path, format="PNG", optimize=True)
    return path


__all__ = [
    "DATA_COLOR", "MODEL_COLOR", "BACKGROUND", "auto_limit", "density_image", "image_grid", "panel_row",
    "scatter_panels", "image_panels", "samples_figure", "save_png",
]
